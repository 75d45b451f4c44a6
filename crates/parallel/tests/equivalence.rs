//! Every sequence-parallel scheme against single-device attention: the global q, k, v
//! and upstream gradient are sharded per rank, each rank (a thread with an in-process
//! communicator) runs the scheme's forward and backward on its shard, and its O, LSE,
//! dQ, dK, dV must equal the single-device results sliced with the same layout.
//!
//! The single-device reference is independent of the code under test: plain Burn
//! tensor attention (softmax over masked scores) on an autodiff device, gradients from
//! autodiff of `sum(O * dO)`.

use std::sync::Mutex;

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use longview_comm::{Communicator, LocalComm, LocalWorld};
use longview_parallel::layout::{SeqLayout, shard};
use longview_parallel::ring::{RingAttention, RingBalance};
use longview_parallel::two_d::{TwoDAttention, TwoDGroups};
use longview_parallel::ulysses::{UlyssesAttention, check_heads};

/// `[b, hq, hkv, n, d]`.
type Dims = [usize; 5];

struct Case {
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    d_o: Tensor<4>,
    o: Tensor<4>,
    lse: Tensor<3>,
    d_q: Tensor<4>,
    d_k: Tensor<4>,
    d_v: Tensor<4>,
    /// Packed batches: every token's sequence id, `[b, n]`.
    segments: Option<Tensor<2, Int>>,
}

/// Standard normal draws (SplitMix64 + Box-Muller), seeded from a case's description.
struct Normal(u64);

impl Normal {
    fn new(case: &impl std::hash::Hash) -> Self {
        use std::hash::{DefaultHasher, Hasher};
        let mut hasher = DefaultHasher::new();
        case.hash(&mut hasher);
        Normal(hasher.finish())
    }

    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // In (0, 1]: the logarithm below stays finite.
        ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    fn tensor(&mut self, shape: [usize; 4], device: &Device) -> Tensor<4> {
        let count: usize = shape.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| {
                let (u, w) = (self.uniform(), self.uniform());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * w).cos()) as f32
            })
            .collect();
        Tensor::from_data(TensorData::new(values, shape), device)
    }
}

/// Single-device attention and its gradients.
fn reference(dims: Dims, causal: bool, scale: f64) -> Case {
    reference_packed(dims, causal, scale, None)
}

/// Sequence ids for packed rows of the given sequence lengths (each row sums to n).
fn sequence_ids(lengths: &[Vec<usize>]) -> Vec<Vec<i64>> {
    lengths
        .iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .flat_map(|(id, &len)| std::iter::repeat_n(id as i64, len))
                .collect()
        })
        .collect()
}

/// As [`reference`], for packed batches: `lengths[b]` are the sequence lengths of row
/// `b`; a token attends only within its sequence.
fn reference_packed(dims: Dims, causal: bool, scale: f64, lengths: Option<&[Vec<usize>]>) -> Case {
    let [b, hq, hkv, n, d] = dims;
    let device = Device::flex().autodiff();
    // Inputs drawn from a generator of this case's own, not Burn's process-wide one
    // (tests run on several threads), so every run checks the same numbers.
    let mut rng = Normal::new(&(dims, causal, lengths.map(<[Vec<usize>]>::to_vec)));
    let q = rng.tensor([b, hq, n, d], &device).require_grad();
    let k = rng.tensor([b, hkv, n, d], &device).require_grad();
    let v = rng.tensor([b, hkv, n, d], &device).require_grad();
    let d_o = rng.tensor([b, hq, n, d], &device);
    let groups = hq / hkv;
    // Query head h reads kv head h / groups: each kv head repeated `groups` times.
    let repeat = |t: Tensor<4>| {
        let heads: Vec<Tensor<4>> = (0..hq)
            .map(|h| t.clone().narrow(1, h / groups, 1))
            .collect();
        Tensor::cat(heads, 1)
    };
    let scores = q.clone().matmul(repeat(k.clone()).swap_dims(2, 3)) * scale;
    let ids = lengths.map(sequence_ids);
    let mut bias = vec![0f32; b * n * n];
    for row in 0..b {
        for i in 0..n {
            for j in 0..n {
                let other_sequence = ids.as_ref().is_some_and(|ids| ids[row][i] != ids[row][j]);
                if (causal && j > i) || other_sequence {
                    bias[(row * n + i) * n + j] = f32::NEG_INFINITY;
                }
            }
        }
    }
    let bias =
        Tensor::<3>::from_data(TensorData::new(bias, [b, n, n]), &device).reshape([b, 1, n, n]);
    let scores = scores + bias;
    let max = scores.clone().max_dim(3).detach();
    let exp = (scores - max.clone()).exp();
    let sum = exp.clone().sum_dim(3);
    let lse = (max + sum.clone().log()).reshape([b, hq, n]);
    let o = (exp / sum).matmul(repeat(v.clone()));
    let grads = (o.clone() * d_o.clone()).sum().backward();
    let inner = |t: Tensor<4>| Tensor::<4>::from_data(t.into_data(), &Device::flex());
    Case {
        d_q: Tensor::from_data(q.grad(&grads).unwrap().into_data(), &Device::flex()),
        d_k: Tensor::from_data(k.grad(&grads).unwrap().into_data(), &Device::flex()),
        d_v: Tensor::from_data(v.grad(&grads).unwrap().into_data(), &Device::flex()),
        q: inner(q),
        k: inner(k),
        v: inner(v),
        d_o: inner(d_o),
        o: inner(o),
        lse: Tensor::from_data(lse.into_data(), &Device::flex()),
        segments: ids.map(|ids| {
            let flat: Vec<i64> = ids.into_iter().flatten().collect();
            Tensor::from_data(TensorData::new(flat, [b, n]), &Device::flex())
        }),
    }
}

/// One rank's results: (O, LSE, dQ, dK, dV).
type RankOut = (Tensor<4>, Tensor<3>, Tensor<4>, Tensor<4>, Tensor<4>);

/// One rank's inputs: (q, k, v, dO) shards and its shard of the sequence ids.
type RankIn = ([Tensor<4>; 4], Option<Tensor<2, Int>>);

/// Runs `work` on every rank of an in-process group, one thread each.
fn on_ranks<T: Send>(world: usize, work: impl Fn(LocalComm) -> T + Sync) -> Vec<T> {
    let comms = LocalWorld::communicators(world);
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| scope.spawn(|| work(comm)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank panicked"))
            .collect()
    })
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.cast(DType::F32).into_data().try_to_vec::<f32>().unwrap()
}

/// Largest |got - want| relative to max(|want|, 1).
fn relative_error<const D: usize>(got: Tensor<D>, want: Tensor<D>) -> f32 {
    assert_eq!(got.dims(), want.dims());
    let (got, want) = (values(got), values(want));
    let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
    got.iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs() / scale)
        .fold(0f32, f32::max)
}

/// Shards the case per `layout`, runs `scheme` on every rank, returns the worst
/// relative error of each of O, LSE, dQ, dK, dV over the ranks.
fn run_scheme(
    case: &Case,
    world: usize,
    layout: SeqLayout,
    dtype: DType,
    scheme: impl Fn(&LocalComm, RankIn) -> RankOut + Sync,
) -> [f32; 5] {
    let cut = |t: &Tensor<4>, r| shard(t.clone(), 2, layout, r, world).unwrap();
    let inputs: Vec<Mutex<Option<RankIn>>> = (0..world)
        .map(|r| {
            let segments = case
                .segments
                .as_ref()
                .map(|s| shard(s.clone(), 1, layout, r, world).unwrap());
            Mutex::new(Some((
                [&case.q, &case.k, &case.v, &case.d_o].map(|t| cut(t, r).cast(dtype)),
                segments,
            )))
        })
        .collect();
    let outputs = on_ranks(world, |comm| {
        let mine = inputs[comm.rank()].lock().unwrap().take().unwrap();
        scheme(&comm, mine)
    });
    let mut worst = [0f32; 5];
    for (r, (o, lse, d_q, d_k, d_v)) in outputs.into_iter().enumerate() {
        assert_eq!(o.dtype(), dtype, "O keeps the input dtype");
        assert_eq!(lse.dtype(), DType::F32, "LSE is f32");
        let errors = [
            relative_error(o, cut(&case.o, r)),
            relative_error(lse, shard(case.lse.clone(), 2, layout, r, world).unwrap()),
            relative_error(d_q, cut(&case.d_q, r)),
            relative_error(d_k, cut(&case.d_k, r)),
            relative_error(d_v, cut(&case.d_v, r)),
        ];
        for (w, e) in worst.iter_mut().zip(errors) {
            *w = w.max(e);
        }
    }
    worst
}

const NAMES: [&str; 5] = ["O", "LSE", "dQ", "dK", "dV"];

fn assert_within(label: &str, errors: [f32; 5], tolerance: f32) {
    let worst = errors.iter().cloned().fold(0f32, f32::max);
    println!("{label}: worst relative error {worst:.2e}");
    for (name, e) in NAMES.iter().zip(errors) {
        assert!(
            e <= tolerance,
            "{label}: {name} relative error {e:.2e} > {tolerance:.0e} (all: {errors:?})"
        );
    }
}

fn ring(
    balance: RingBalance,
    causal: bool,
    scale: f64,
) -> impl Fn(&LocalComm, RankIn) -> RankOut + Sync {
    move |comm, ([q, k, v, d_o], segments)| {
        let attn = RingAttention {
            balance,
            causal,
            scale,
        };
        let (o, lse) = attn
            .forward_packed(comm, q.clone(), k.clone(), v.clone(), segments.clone())
            .unwrap();
        let (d_q, d_k, d_v) = attn
            .backward_packed(comm, (q, k, v), o.clone(), lse.clone(), d_o, segments)
            .unwrap();
        (o, lse, d_q, d_k, d_v)
    }
}

/// f32 runs: the schemes only reorder f32 sums, so they agree with the single-device
/// f32 reference to round-off (measured up to ~1e-6; 2e-5 leaves room).
const F32_TOLERANCE: f32 = 2e-5;

#[test]
fn ring_plain_and_zigzag_equal_single_device_for_every_world_size() {
    for world in [1, 2, 4, 8] {
        for (hq, hkv) in [(2, 2), (4, 1), (6, 2)] {
            let dims = [2, hq, hkv, 16 * 3, 8];
            for causal in [true, false] {
                let case = reference(dims, causal, 0.35);
                for (balance, layout) in [
                    (RingBalance::Plain, SeqLayout::Contiguous),
                    (RingBalance::Zigzag, SeqLayout::Zigzag),
                ] {
                    let errors = run_scheme(
                        &case,
                        world,
                        layout,
                        DType::F32,
                        ring(balance, causal, 0.35),
                    );
                    assert_within(
                        &format!("ring {balance:?} P={world} {dims:?} causal={causal}"),
                        errors,
                        F32_TOLERANCE,
                    );
                }
            }
        }
    }
}

#[test]
fn ulysses_equals_single_device_including_kv_head_replication() {
    for world in [1, 2, 4, 8] {
        // (8, 8): MHA; (8, 2): GQA with P > kv heads for P = 4, 8 (replicated kv heads).
        for (hq, hkv) in [(8, 8), (8, 2), (16, 4)] {
            let dims = [1, hq, hkv, 16 * 2, 8];
            for causal in [true, false] {
                let case = reference(dims, causal, 0.3);
                for layout in [SeqLayout::Contiguous, SeqLayout::Zigzag] {
                    let errors = run_scheme(
                        &case,
                        world,
                        layout,
                        DType::F32,
                        ulysses(layout, causal, 0.3),
                    );
                    assert_within(
                        &format!("Ulysses {layout} P={world} {dims:?} causal={causal}"),
                        errors,
                        F32_TOLERANCE,
                    );
                }
            }
        }
    }
}

fn ulysses(
    layout: SeqLayout,
    causal: bool,
    scale: f64,
) -> impl Fn(&LocalComm, RankIn) -> RankOut + Sync {
    move |comm, ([q, k, v, d_o], segments)| {
        let attn = UlyssesAttention {
            layout,
            causal,
            scale,
        };
        let (o, lse) = attn
            .forward_packed(comm, q.clone(), k.clone(), v.clone(), segments.clone())
            .unwrap();
        let (d_q, d_k, d_v) = attn
            .backward_packed(comm, (q, k, v), o.clone(), lse.clone(), d_o, segments)
            .unwrap();
        (o, lse, d_q, d_k, d_v)
    }
}

fn two_d(
    causal: bool,
    scale: f64,
    ulysses: usize,
) -> impl Fn(&LocalComm, RankIn) -> RankOut + Sync {
    move |comm, ([q, k, v, d_o], segments)| {
        let groups = TwoDGroups::new(comm, ulysses).unwrap();
        let attn = TwoDAttention { causal, scale };
        let (o, lse) = attn
            .forward_packed(&groups, q.clone(), k.clone(), v.clone(), segments.clone())
            .unwrap();
        let (d_q, d_k, d_v) = attn
            .backward_packed(&groups, (q, k, v), o.clone(), lse.clone(), d_o, segments)
            .unwrap();
        (o, lse, d_q, d_k, d_v)
    }
}

/// Packed batches: ragged sequences whose boundaries fall inside zigzag chunks and
/// shards; a block of one rank may hold no key of a query's sequence (O = 0, LSE =
/// -inf partials that the merge must skip).
#[test]
fn packed_sequences_stay_apart_under_every_scheme() {
    let lengths = vec![vec![5, 20, 1, 30, 8], vec![33, 31]];
    for causal in [true, false] {
        let case = reference_packed([2, 8, 2, 64, 8], causal, 0.3, Some(&lengths));
        for world in [1, 2, 4, 8] {
            for (balance, layout) in [
                (RingBalance::Plain, SeqLayout::Contiguous),
                (RingBalance::Zigzag, SeqLayout::Zigzag),
            ] {
                let errors =
                    run_scheme(&case, world, layout, DType::F32, ring(balance, causal, 0.3));
                assert_within(
                    &format!("packed ring {balance:?} P={world} causal={causal}"),
                    errors,
                    F32_TOLERANCE,
                );
            }
            for layout in [SeqLayout::Contiguous, SeqLayout::Zigzag] {
                let errors = run_scheme(
                    &case,
                    world,
                    layout,
                    DType::F32,
                    ulysses(layout, causal, 0.3),
                );
                assert_within(
                    &format!("packed Ulysses {layout} P={world} causal={causal}"),
                    errors,
                    F32_TOLERANCE,
                );
            }
        }
        for (u, r) in [(2, 2), (2, 4), (4, 2)] {
            let layout = SeqLayout::TwoD { ulysses: u };
            let errors = run_scheme(&case, u * r, layout, DType::F32, two_d(causal, 0.3, u));
            assert_within(
                &format!("packed 2D U={u} R={r} causal={causal}"),
                errors,
                F32_TOLERANCE,
            );
        }
    }
}

#[test]
fn two_d_equals_single_device_for_ulysses_and_ring_degrees_up_to_4() {
    for ulysses in [1, 2, 4] {
        for ring_degree in [1, 2, 4] {
            let world = ulysses * ring_degree;
            for (hq, hkv) in [(4, 4), (8, 2)] {
                let dims = [1, hq, hkv, 16 * 4, 8];
                for causal in [true, false] {
                    let case = reference(dims, causal, 0.3);
                    let layout = SeqLayout::TwoD { ulysses };
                    let errors = run_scheme(
                        &case,
                        world,
                        layout,
                        DType::F32,
                        two_d(causal, 0.3, ulysses),
                    );
                    assert_within(
                        &format!("2D U={ulysses} R={ring_degree} {dims:?} causal={causal}"),
                        errors,
                        F32_TOLERANCE,
                    );
                }
            }
        }
    }
}

/// bf16 inputs: the schemes merge partial results in f32 and accumulate dK/dV in f32,
/// so the error against the f32 reference must not grow with the number of ranks.
/// Measured errors are printed (`--nocapture`) and recorded in the crate README.
#[test]
fn bf16_error_does_not_grow_with_world_size() {
    let dims = [1, 4, 2, 16 * 8, 16];
    let case = reference(dims, true, 0.25);
    let mut by_world = Vec::new();
    for world in [1, 2, 4, 8] {
        let errors = run_scheme(
            &case,
            world,
            SeqLayout::Zigzag,
            DType::BF16,
            ring(RingBalance::Zigzag, true, 0.25),
        );
        let shown: Vec<String> = errors.iter().map(|e| format!("{e:.2e}")).collect();
        println!(
            "bf16 zigzag ring P={world}: O, LSE, dQ, dK, dV relative errors {}",
            shown.join(", ")
        );
        by_world.push(errors);
    }
    for (world, errors) in [1, 2, 4, 8].iter().zip(&by_world) {
        // bf16 keeps 8 significant bits (relative step 7.8e-3): inputs and outputs are
        // rounded once each.
        assert_within(&format!("bf16 P={world}"), *errors, 3e-2);
        for (i, name) in NAMES.iter().enumerate() {
            assert!(
                errors[i] <= 2.0 * by_world[0][i] + 4e-3,
                "bf16 {name} error grows with world size: P=1 {:.2e}, P={world} {:.2e}",
                by_world[0][i],
                errors[i]
            );
        }
    }
}

#[test]
fn impossible_head_splits_and_lengths_are_refused_with_the_rule() {
    // Qwen2-7B (28 query / 4 kv heads) with a Ulysses degree of 14: a released peer
    // config did this.
    let err = check_heads(28, 4, 14).unwrap_err().to_string();
    assert!(
        err.contains("degree > kv heads but degree % kv heads != 0"),
        "{err}"
    );
    assert!(check_heads(28, 4, 3).is_err());
    assert!(check_heads(8, 2, 16).is_err());
    check_heads(28, 4, 4).unwrap();
    check_heads(28, 4, 2).unwrap();
    check_heads(32, 4, 8).unwrap();

    let t = Tensor::<4>::zeros([1, 2, 30, 4], &Device::flex());
    let err = shard(t.clone(), 2, SeqLayout::Zigzag, 0, 4)
        .unwrap_err()
        .to_string();
    assert!(err.contains("multiple of 8"), "{err}");

    // A Ulysses run whose heads do not split fails on every rank with the rule.
    let errors = on_ranks(2, |comm| {
        let q = Tensor::<4>::zeros([1, 3, 4, 4], &Device::flex());
        let attn = UlyssesAttention {
            layout: SeqLayout::Contiguous,
            causal: true,
            scale: 1.0,
        };
        attn.forward(&comm, q.clone(), q.clone(), q)
            .unwrap_err()
            .to_string()
    });
    for e in errors {
        assert!(e.contains("query heads % degree != 0"), "{e}");
    }
}
