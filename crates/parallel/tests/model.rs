//! The debug Qwen2 LLM with `AttentionImpl::Sharded` on P ranks (each holding its
//! shard of the tokens and their global positions) against the same model on one
//! device: logits per shard, and parameter gradients summed over the ranks.

use std::sync::Arc;

use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use longview_comm::{Communicator, LocalComm, LocalWorld, ReduceOp};
use longview_models::attention::AttentionImpl;
use longview_models::vila::{Qwen2, TextConfig, default_position_ids};
use longview_parallel::autodiff::{DistributedAttention, WithComm};
use longview_parallel::layout::{SeqLayout, shard};
use longview_parallel::model::install;
use longview_parallel::ring::{RingAttention, RingBalance};
use longview_parallel::two_d::{TwoDAttention, TwoDGroups};
use longview_parallel::ulysses::UlyssesAttention;

/// A few parameters spread over the model: embeddings, attention projections of
/// both layers, an MLP weight, the LM head.
fn watched(model: &Qwen2) -> Vec<(&'static str, Tensor<2>)> {
    let layers = &model.model.layers;
    vec![
        ("embed_tokens", model.model.embed_tokens.weight.val()),
        ("layer0.q_proj", layers[0].self_attn.q_proj.weight.val()),
        ("layer0.k_proj", layers[0].self_attn.k_proj.weight.val()),
        ("layer1.v_proj", layers[1].self_attn.v_proj.weight.val()),
        ("layer1.down_proj", layers[1].mlp.down_proj.weight.val()),
        ("lm_head", model.lm_head.as_ref().unwrap().weight.val()),
    ]
}

fn relative_error<const D: usize>(got: Tensor<D>, want: Tensor<D>) -> f32 {
    let got: Vec<f32> = got.into_data().iter::<f32>().collect();
    let want: Vec<f32> = want.into_data().iter::<f32>().collect();
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1e-3f32, |m, x| m.max(x.abs()));
    got.iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0f32, f32::max)
}

fn plain<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    Tensor::from_data(t.into_data(), &Device::flex())
}

fn check(
    label: &str,
    world: usize,
    layout: SeqLayout,
    make: impl Fn(LocalComm) -> Arc<dyn DistributedAttention> + Sync,
) {
    let device = Device::flex().autodiff();
    let config = TextConfig::debug();
    let scale = (config.head_dim() as f64).powf(-0.5);
    let model = config.init(&device);
    let n = 32;
    let ids: Vec<i64> = (0..n as i64).map(|i| (i * 37 + 11) % 300).collect();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, n]), &device);
    let weights = Tensor::<3>::random([1, n, 300], Distribution::Normal(0.0, 1.0), &device);

    let logits = model.forward(ids.clone(), default_position_ids(1, n, &device));
    let grads = (logits.clone() * weights.clone()).sum().backward();
    let reference: Vec<_> = watched(&model)
        .into_iter()
        .map(|(name, p)| (name, plain(p.grad(&grads).unwrap())))
        .collect();

    let comms = LocalWorld::communicators(world);
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let (model, ids, weights, logits, reference, make, device) =
                    (&model, &ids, &weights, &logits, &reference, &make, &device);
                scope.spawn(move || {
                    let rank = comm.rank();
                    // Its own group for the gradient sum, apart from the attention's.
                    let grads_comm = comm.split(&[(0..world).collect()]).unwrap();
                    let _installed = install(make(comm), true, scale, label);
                    let sharded = model.clone().with_attention(AttentionImpl::Sharded);
                    let positions: Vec<i64> = layout
                        .positions(n, rank, world)
                        .unwrap()
                        .into_iter()
                        .map(|p| p as i64)
                        .collect();
                    let local = positions.len();
                    let positions =
                        Tensor::<2, Int>::from_data(TensorData::new(positions, [1, local]), device);
                    let my_ids = shard(ids.clone(), 1, layout, rank, world).unwrap();
                    let my_weights = shard(weights.clone(), 1, layout, rank, world).unwrap();
                    let my_logits = sharded.forward(my_ids, positions);
                    let want = shard(plain(logits.clone()), 1, layout, rank, world).unwrap();
                    let error = relative_error(plain(my_logits.clone()), want);
                    assert!(
                        error <= 2e-5,
                        "{label} rank {rank}: logits error {error:.2e}"
                    );
                    let grads = (my_logits * my_weights).sum().backward();
                    for ((name, param), (_, want)) in watched(&sharded).into_iter().zip(reference) {
                        let partial = plain(param.grad(&grads).unwrap());
                        let total = grads_comm.all_reduce(partial, ReduceOp::Sum).unwrap();
                        let error = relative_error(total, want.clone());
                        assert!(
                            error <= 5e-5,
                            "{label} rank {rank}: gradient of {name} off by {error:.2e}"
                        );
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("rank panicked");
        }
    });
}

#[test]
fn debug_llm_under_every_scheme_matches_one_device() {
    let causal = |balance| RingAttention {
        balance,
        causal: true,
        scale: (TextConfig::debug().head_dim() as f64).powf(-0.5),
    };
    let scale = causal(RingBalance::Plain).scale;
    for world in [2, 4] {
        check(
            &format!("zigzag ring P={world}"),
            world,
            SeqLayout::Zigzag,
            |comm| {
                Arc::new(WithComm {
                    comm,
                    attention: causal(RingBalance::Zigzag),
                })
            },
        );
        check(
            &format!("plain ring P={world}"),
            world,
            SeqLayout::Contiguous,
            |comm| {
                Arc::new(WithComm {
                    comm,
                    attention: causal(RingBalance::Plain),
                })
            },
        );
        // The debug LLM has 4 query / 2 kv heads: P=4 replicates each kv head twice.
        check(
            &format!("Ulysses P={world}"),
            world,
            SeqLayout::Zigzag,
            |comm| {
                Arc::new(WithComm {
                    comm,
                    attention: UlyssesAttention {
                        layout: SeqLayout::Zigzag,
                        causal: true,
                        scale,
                    },
                })
            },
        );
    }
    check("2D U=2 R=2", 4, SeqLayout::TwoD { ulysses: 2 }, |comm| {
        Arc::new(WithComm {
            comm: TwoDGroups::new(&comm, 2).unwrap(),
            attention: TwoDAttention {
                causal: true,
                scale,
            },
        })
    });
}

#[test]
#[should_panic(expected = "no sequence-parallel attention is installed")]
fn a_sharded_model_without_an_installed_scheme_says_so() {
    let device = Device::flex();
    let model = TextConfig::debug()
        .init(&device)
        .with_attention(AttentionImpl::Sharded);
    let ids = Tensor::<2, Int>::zeros([1, 4], &device);
    model.forward(ids, default_position_ids(1, 4, &device));
}
