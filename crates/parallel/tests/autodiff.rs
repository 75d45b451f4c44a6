//! The sequence-parallel schemes as one autodiff op: gradients of q, k, v from Burn's
//! backward on every rank equal single-device autodiff attention sliced per rank, and
//! the backward never re-runs the distributed forward (counted).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use longview_comm::{Communicator, LocalComm, LocalWorld};
use longview_parallel::Result;
use longview_parallel::autodiff::{DistributedAttention, WithComm, distributed_attention};
use longview_parallel::layout::{SeqLayout, shard};
use longview_parallel::ring::{RingAttention, RingBalance};
use longview_parallel::two_d::{TwoDAttention, TwoDGroups};
use longview_parallel::ulysses::UlyssesAttention;

/// Counts calls into the wrapped scheme.
struct Counted {
    inner: Box<dyn DistributedAttention>,
    forwards: AtomicUsize,
    backwards: AtomicUsize,
}

impl DistributedAttention for Counted {
    fn forward(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Result<(Tensor<4>, Tensor<3>)> {
        self.forwards.fetch_add(1, Ordering::SeqCst);
        self.inner.forward(q, k, v)
    }
    fn backward(
        &self,
        qkv: (Tensor<4>, Tensor<4>, Tensor<4>),
        o: Tensor<4>,
        lse: Tensor<3>,
        d_o: Tensor<4>,
    ) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
        self.backwards.fetch_add(1, Ordering::SeqCst);
        self.inner.backward(qkv, o, lse, d_o)
    }
}

/// Global q, k, v, dO as host data and the reference gradients (plain tensor attention
/// under autodiff, causal).
struct Reference {
    inputs: [Tensor<4>; 4],
    grads: [Tensor<4>; 3],
    o: Tensor<4>,
}

fn reference(b: usize, hq: usize, hkv: usize, n: usize, d: usize, scale: f64) -> Reference {
    let ad = Device::flex().autodiff();
    let dist = Distribution::Normal(0.0, 1.0);
    let make = |h| Tensor::<4>::random([b, h, n, d], dist, &Device::flex());
    let (q, k, v, d_o) = (make(hq), make(hkv), make(hkv), make(hq));
    let leaf = |t: &Tensor<4>| Tensor::<4>::from_data(t.to_data(), &ad).require_grad();
    let (ql, kl, vl) = (leaf(&q), leaf(&k), leaf(&v));
    let g = hq / hkv;
    let repeat =
        |t: Tensor<4>| Tensor::cat((0..hq).map(|h| t.clone().narrow(1, h / g, 1)).collect(), 1);
    let mut bias = vec![0f32; n * n];
    for i in 0..n {
        for j in i + 1..n {
            bias[i * n + j] = f32::NEG_INFINITY;
        }
    }
    let bias = Tensor::<2>::from_data(TensorData::new(bias, [n, n]), &ad).reshape([1, 1, n, n]);
    let scores = ql.clone().matmul(repeat(kl.clone()).swap_dims(2, 3)) * scale + bias;
    let o = burn::tensor::activation::softmax(scores, 3).matmul(repeat(vl.clone()));
    let grads = (o.clone() * Tensor::from_data(d_o.to_data(), &ad))
        .sum()
        .backward();
    let plain = |t: Tensor<4>| Tensor::<4>::from_data(t.into_data(), &Device::flex());
    Reference {
        grads: [&ql, &kl, &vl].map(|t| plain(t.grad(&grads).unwrap())),
        o: plain(o),
        inputs: [q, k, v, d_o],
    }
}

fn worst(got: Tensor<4>, want: Tensor<4>) -> f32 {
    let got: Vec<f32> = got.into_data().iter::<f32>().collect();
    let want: Vec<f32> = want.into_data().iter::<f32>().collect();
    let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
    got.iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0f32, f32::max)
}

fn check(
    label: &str,
    world: usize,
    layout: SeqLayout,
    dims: (usize, usize, usize, usize, usize),
    make: impl Fn(LocalComm) -> Box<dyn DistributedAttention> + Sync,
) {
    let (b, hq, hkv, n, d) = dims;
    let reference = reference(b, hq, hkv, n, d, 0.3);
    let comms = LocalWorld::communicators(world);
    let results: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let (reference, make) = (&reference, &make);
                scope.spawn(move || {
                    let r = comm.rank();
                    let ad = Device::flex().autodiff();
                    let cut = |t: &Tensor<4>| shard(t.clone(), 2, layout, r, world).unwrap();
                    let [q, k, v, d_o] = reference
                        .inputs
                        .each_ref()
                        .map(|t| Tensor::<4>::from_data(cut(t).into_data(), &ad));
                    let (q, k, v) = (q.require_grad(), k.require_grad(), v.require_grad());
                    let counted = Arc::new(Counted {
                        inner: make(comm),
                        forwards: AtomicUsize::new(0),
                        backwards: AtomicUsize::new(0),
                    });
                    let (o, _lse) =
                        distributed_attention(counted.clone(), q.clone(), k.clone(), v.clone())
                            .unwrap();
                    let grads = (o.clone() * d_o).sum().backward();
                    let plain =
                        |t: Tensor<4>| Tensor::<4>::from_data(t.into_data(), &Device::flex());
                    let errors = [
                        worst(plain(o), cut(&reference.o)),
                        worst(plain(q.grad(&grads).unwrap()), cut(&reference.grads[0])),
                        worst(plain(k.grad(&grads).unwrap()), cut(&reference.grads[1])),
                        worst(plain(v.grad(&grads).unwrap()), cut(&reference.grads[2])),
                    ];
                    let calls = (
                        counted.forwards.load(Ordering::SeqCst),
                        counted.backwards.load(Ordering::SeqCst),
                    );
                    (errors, calls)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank panicked"))
            .collect()
    });
    for (rank, (errors, calls)) in results.into_iter().enumerate() {
        assert_eq!(
            calls,
            (1, 1),
            "{label} rank {rank}: (forward, backward) calls"
        );
        for (name, e) in ["O", "dQ", "dK", "dV"].iter().zip(errors) {
            assert!(
                e <= 2e-5,
                "{label} rank {rank}: {name} relative error {e:.2e} > 2e-5"
            );
        }
    }
}

#[test]
fn autodiff_through_every_scheme_matches_single_device_gradients() {
    for world in [2, 4] {
        check(
            &format!("zigzag ring P={world}"),
            world,
            SeqLayout::Zigzag,
            (1, 4, 2, 32, 8),
            |comm| {
                Box::new(WithComm {
                    comm,
                    attention: RingAttention {
                        balance: RingBalance::Zigzag,
                        causal: true,
                        scale: 0.3,
                    },
                })
            },
        );
        check(
            &format!("Ulysses P={world}"),
            world,
            SeqLayout::Contiguous,
            (1, 4, 2, 32, 8),
            |comm| {
                Box::new(WithComm {
                    comm,
                    attention: UlyssesAttention {
                        layout: SeqLayout::Contiguous,
                        causal: true,
                        scale: 0.3,
                    },
                })
            },
        );
    }
    check(
        "2D U=2 R=2",
        4,
        SeqLayout::TwoD { ulysses: 2 },
        (1, 4, 2, 32, 8),
        |comm| {
            Box::new(WithComm {
                comm: TwoDGroups::new(&comm, 2).unwrap(),
                attention: TwoDAttention {
                    causal: true,
                    scale: 0.3,
                },
            })
        },
    );
}

#[test]
fn plain_devices_run_the_forward_only() {
    let comm = LocalWorld::communicators(1).pop().unwrap();
    let attention = Arc::new(WithComm {
        comm,
        attention: RingAttention {
            balance: RingBalance::Plain,
            causal: false,
            scale: 1.0,
        },
    });
    let q = Tensor::<4>::random([1, 2, 4, 8], Distribution::Default, &Device::flex());
    let (o, lse) = distributed_attention(attention, q.clone(), q.clone(), q).unwrap();
    assert_eq!(o.dims(), [1, 2, 4, 8]);
    assert_eq!(lse.dims(), [1, 2, 4]);
    assert!(!o.is_autodiff());
}
