//! The policy's log-probabilities of sampled response tokens, recomputed by a
//! training forward in the layout the rollout ran in: the prompt's ids with the same
//! visual tokens spliced at its placeholders, the response after it, positions
//! `0..len`. Only the response rows go through the final norm and the LM head.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use longview_models::Vlm;
use longview_models::vila::default_position_ids;

use crate::error::TrainError;

/// A group's sampled responses to one prompt, as the rollout saw them.
#[derive(Debug, Clone, Copy)]
pub struct Rollout<'a> {
    pub prompt: &'a [u32],
    /// The prompt's visual tokens (`[frames, tokens_per_frame, hidden]`), shared by
    /// every response.
    pub visual: Option<&'a Tensor<3>>,
    pub responses: &'a [Vec<u32>],
    /// The sampling temperature: every pass divides the logits by it.
    pub temperature: f64,
}

impl Rollout<'_> {
    /// The longest response (0 when all are empty).
    pub fn longest(&self) -> usize {
        self.responses.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// Token embeddings of prompt + response, right-padded to `len` rows, with the
    /// visual tokens written over the prompt's placeholders only (a response may
    /// contain the placeholder id as a sampled token; the rollout embedded it as
    /// text, and so does this).
    ///
    /// # Shapes
    /// - output: `[responses, len, hidden]`
    pub fn embeds(
        &self,
        model: &Vlm,
        len: usize,
        device: &Device,
    ) -> Result<Tensor<3>, TrainError> {
        let n = self.responses.len();
        let filler = i64::from(model.placeholder_token_id == 0);
        let prompt = || self.prompt.iter().map(|&t| t as i64);
        let (mut ids, mut splice_ids) = (Vec::with_capacity(n * len), Vec::with_capacity(n * len));
        for response in self.responses {
            ids.extend(prompt());
            ids.extend(response.iter().map(|&t| t as i64));
            ids.extend(std::iter::repeat_n(
                0,
                len - self.prompt.len() - response.len(),
            ));
            splice_ids.extend(prompt());
            splice_ids.extend(std::iter::repeat_n(filler, len - self.prompt.len()));
        }
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [n, len]), device);
        let splice_ids = Tensor::<2, Int>::from_data(TensorData::new(splice_ids, [n, len]), device);
        let visual = self.visual.map(|v| Tensor::cat(vec![v.clone(); n], 0));
        Ok(model.splice(model.embed_tokens(ids), &splice_ids, visual)?)
    }

    /// Response token `k` of every response (0 past its end) and whether it is one,
    /// for the response positions `ks`.
    ///
    /// # Shapes
    /// - outputs: `[responses, ks.len()]`
    pub fn targets(&self, ks: &[usize], device: &Device) -> (Tensor<2, Int>, Tensor<2>) {
        let (n, m) = (self.responses.len(), ks.len());
        let mut targets = Vec::with_capacity(n * m);
        let mut mask = Vec::with_capacity(n * m);
        for response in self.responses {
            for &k in ks {
                targets.push(response.get(k).map_or(0, |&t| t as i64));
                mask.push(f32::from(u8::from(k < response.len())));
            }
        }
        (
            Tensor::from_data(TensorData::new(targets, [n, m]), device),
            Tensor::from_data(TensorData::new(mask, [n, m]), device),
        )
    }
}

/// Log-probs of a group of responses to one prompt, `[responses, max_len]`.
pub struct ResponseLogprobs {
    /// `log softmax(logits / temperature)` at each response token (tracked when the
    /// model is); 0 at padding.
    pub logp: Tensor<2>,
    /// 1 at response tokens, 0 at padding.
    pub mask: Tensor<2>,
    /// Per-token entropy of the tempered distribution (untracked), `[responses,
    /// max_len]`.
    pub entropy: Tensor<2>,
}

/// The log-probs of the response tokens `ks` predicted by the last layer's rows
/// `hidden` (`[responses, ks.len(), hidden]`, row `j` predicting token `ks[j]`).
pub fn token_logprobs(
    model: &Vlm,
    rollout: &Rollout<'_>,
    hidden: Tensor<3>,
    ks: &[usize],
    device: &Device,
) -> ResponseLogprobs {
    let [n, m, _] = hidden.dims();
    let all = log_softmax(
        model
            .generation_logits(hidden)
            .div_scalar(rollout.temperature),
        2,
    );
    let entropy = {
        let p = all.clone().detach();
        (p.clone().exp() * p).sum_dim(2).neg().reshape([n, m])
    };
    let (targets, mask) = rollout.targets(ks, device);
    let picked = all.gather(2, targets.unsqueeze_dim::<3>(2)).reshape([n, m]);
    ResponseLogprobs {
        logp: picked * mask.clone(),
        entropy: entropy * mask.clone(),
        mask,
    }
}

/// Runs the prompt + each response (right-padded) through `model` and returns each
/// response token's log-probability at the rollout's temperature. `None` when every
/// response is empty.
pub fn response_logprobs(
    model: &Vlm,
    rollout: &Rollout<'_>,
    device: &Device,
) -> Result<Option<ResponseLogprobs>, TrainError> {
    let longest = rollout.longest();
    if longest == 0 || rollout.prompt.is_empty() {
        return Ok(None);
    }
    let n = rollout.responses.len();
    let len = rollout.prompt.len() + longest;
    let mut x = rollout.embeds(model, len, device)?;
    let rope = model.text_context(default_position_ids(n, len, device));
    for layer in model.text_layers() {
        x = layer.forward(x, &rope);
    }
    // Row prompt_len - 1 + k predicts response token k.
    let rows = x.narrow(1, rollout.prompt.len() - 1, longest);
    let ks: Vec<usize> = (0..longest).collect();
    Ok(Some(token_logprobs(model, rollout, rows, &ks, device)))
}
