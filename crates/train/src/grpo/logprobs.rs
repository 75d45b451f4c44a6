//! The policy's log-probabilities of sampled response tokens, recomputed by a
//! training forward in the layout the rollout ran in: the prompt's ids with the same
//! visual tokens spliced at its placeholders, the response after it, positions
//! `0..len`. Only the response rows go through the final norm and the LM head.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use longview_models::Vlm;
use longview_models::vila::default_position_ids;

use crate::error::TrainError;

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

/// Runs `prompt` + each response (right-padded) through `model` with `visual`
/// (`[frames, tokens_per_frame, hidden]`, the prompt's visual tokens, shared by
/// every response) and returns each response token's log-probability at
/// `temperature`. `None` when every response is empty.
pub fn response_logprobs(
    model: &Vlm,
    prompt: &[u32],
    visual: Option<&Tensor<3>>,
    responses: &[Vec<u32>],
    temperature: f64,
    device: &Device,
) -> Result<Option<ResponseLogprobs>, TrainError> {
    let n = responses.len();
    let longest = responses.iter().map(Vec::len).max().unwrap_or(0);
    if longest == 0 || prompt.is_empty() {
        return Ok(None);
    }
    let len = prompt.len() + longest;
    let mut ids = Vec::with_capacity(n * len);
    // Where the visual tokens go: the prompt's placeholders only. A response may
    // contain the placeholder id as a sampled token; the rollout embedded it as text,
    // and so does this pass.
    let mut splice_ids = Vec::with_capacity(n * len);
    let mut targets = Vec::with_capacity(n * longest);
    let mut mask = Vec::with_capacity(n * longest);
    let filler = i64::from(model.placeholder_token_id == 0);
    for response in responses {
        ids.extend(prompt.iter().map(|&t| t as i64));
        ids.extend(response.iter().map(|&t| t as i64));
        ids.extend(std::iter::repeat_n(0, longest - response.len()));
        splice_ids.extend(prompt.iter().map(|&t| t as i64));
        splice_ids.extend(std::iter::repeat_n(filler, longest));
        targets.extend(response.iter().map(|&t| t as i64));
        targets.extend(std::iter::repeat_n(0, longest - response.len()));
        mask.extend(std::iter::repeat_n(1.0f32, response.len()));
        mask.extend(std::iter::repeat_n(0.0f32, longest - response.len()));
    }
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [n, len]), device);
    let splice_ids = Tensor::<2, Int>::from_data(TensorData::new(splice_ids, [n, len]), device);
    let visual = visual.map(|v| Tensor::cat(vec![v.clone(); n], 0));
    let mut x = model.splice(model.embed_tokens(ids), &splice_ids, visual)?;
    let rope = model.text_context(default_position_ids(n, len, device));
    for layer in model.text_layers() {
        x = layer.forward(x, &rope);
    }
    // Row prompt_len - 1 + k predicts response token k.
    let rows = x.narrow(1, prompt.len() - 1, longest);
    let logits = model.logits(rows).div_scalar(temperature);
    let all = log_softmax(logits, 2);
    let entropy = {
        let p = all.clone().detach();
        (p.clone().exp() * p).sum_dim(2).neg().reshape([n, longest])
    };
    let targets = Tensor::<2, Int>::from_data(TensorData::new(targets, [n, longest]), device);
    let mask = Tensor::<2>::from_data(TensorData::new(mask, [n, longest]), device);
    let picked = all
        .gather(2, targets.unsqueeze_dim::<3>(2))
        .reshape([n, longest]);
    Ok(Some(ResponseLogprobs {
        logp: picked * mask.clone(),
        entropy: entropy * mask.clone(),
        mask,
    }))
}
