//! `longview infer-bench --parallel SP`: the same phases on SP sequence-parallel ranks
//! (threads on the CPU, or one process per GPU over NCCL with `--nproc`): every rank
//! encodes a share of the frames and the visual tokens are gathered (MR-SP's first
//! stage), the prompt is prefilled with the `--sp-scheme` attention leaving each rank
//! its shard of the KV cache, and the answer is decoded greedily against the sharded
//! cache. Rank 0's weights and frames are broadcast first, so every rank runs the same
//! model on the same input. Timings are rank 0's, each phase ending with a device
//! synchronisation; memory is rank 0's allocator reservation.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{Device, Int, Tensor, TensorData};
use longview_comm::Communicator;
use longview_infer::generate::{Decoding, GenerateOptions, decode_group, next_token_rows};
use longview_infer::prefill::check_request_fits;
use longview_models::{VisualInput, VlmConfig};
use longview_parallel::inference::SpInference;
use longview_train::TrainError;
use serde_json::{Value, json};

use crate::infer_bench::{InferBenchArgs, Measured};
use crate::ranks::{RankJob, Ranks};

/// Runs the phases on `ranks`; rank 0's measurements (`None` on a process that does
/// not report).
pub fn run(
    args: &InferBenchArgs,
    config: &VlmConfig,
    ranks: &Ranks,
) -> Result<Option<(Measured, Value)>> {
    let job = BenchJob { args, config };
    let measured = ranks.run(&job, &args.device)?;
    Ok(ranks.prints().then(|| {
        let extra = json!({
            "ranks": args.parallel, "sp_scheme": args.sp_scheme.to_string(),
            "encode": "frames sharded over the ranks, tokens gathered",
        });
        (measured, extra)
    }))
}

struct BenchJob<'a> {
    args: &'a InferBenchArgs,
    config: &'a VlmConfig,
}

impl RankJob for BenchJob<'_> {
    type Output = Measured;

    fn run<C: Communicator + Send + Sync + 'static>(
        &self,
        comm: C,
        device: &Device,
        _log: &mut dyn FnMut(&str),
    ) -> Result<Self::Output, TrainError> {
        let args = self.args;
        let device = device.clone().inner();
        let failed = |what: &str, e: String| TrainError::Request(format!("{what}: {e}"));
        let model = longview_train::grad_sync::broadcast_params(self.config.init(&device), &comm)?;
        let sample = crate::synthetic::batch(
            self.config,
            1,
            args.frames,
            args.text_tokens,
            0,
            args.device.seed(),
            &device,
        )
        .map_err(|e| failed("the generated prompt", e.to_string()))?;
        let ids: Vec<u32> = sample
            .input
            .input_ids
            .into_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .map_err(|e| failed("the prompt's ids", format!("{e:?}")))?
            .into_iter()
            .map(|t| t as u32)
            .collect();
        let VisualInput::Pixels(pixels) = sample.input.visual else {
            return Err(failed("the generated prompt", "has no frames".into()));
        };
        let pixels = comm
            .broadcast(pixels, 0)
            .map_err(|e| failed("broadcasting the frames", e.to_string()))?;
        let sync = || {
            device
                .sync()
                .map_err(|e| failed("device sync", format!("{e:?}")))
        };
        let world = args.parallel;
        // Each rank's share of the prompt runs at once.
        let per_rank = ids.len().div_ceil(world);
        check_request_fits(
            &model,
            (per_rank, args.new_tokens, 1),
            per_rank,
            None,
            &device,
        )?;
        sync()?;

        let start = Instant::now();
        let visual = longview_train::grpo::passes::encode_frames_sharded(&model, pixels, &comm)?;
        sync()?;
        let encode_s = start.elapsed().as_secs_f64();

        let text = &self.config.text;
        let sp = SpInference::with_scheme(
            comm,
            text.head_dim(),
            text.num_heads,
            text.num_kv_heads,
            args.sp_scheme,
        )?;

        let start = Instant::now();
        let (mut cache, first) =
            sp.prefill_prompt(&model, &ids, VisualInput::Embeddings(visual), &device)?;
        let prefill_s = start.elapsed().as_secs_f64();

        let options = GenerateOptions::new(args.new_tokens, Decoding::Greedy, Vec::new());
        let start = Instant::now();
        let generated = decode_group(first, &[Decoding::Greedy], &options, |tokens, _| {
            let ids = Tensor::<2, Int>::from_data(
                TensorData::new(tokens.to_vec(), [tokens.len(), 1]),
                &device,
            );
            let hidden = sp.extend(&model, model.embed_tokens(ids), &mut cache)?;
            next_token_rows(&model, hidden)
        })?;
        sync()?;
        let decode_s = start.elapsed().as_secs_f64();
        Ok(Measured {
            prompt: ids.len(),
            encode_s,
            prefill_s,
            decode_s,
            decoded: generated[0].tokens.len(),
            reserved: device.memory_pool_usage().map(|m| m.bytes_reserved),
            decode_split: None,
        })
    }
}
