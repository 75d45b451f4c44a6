//! The head's backward: final norm, LM head and cross entropy on the supervised rows,
//! a slice of rows at a time.
//!
//! Each slice (at most [`Vlm::loss_chunk_rows`] rows: 1 GiB of f32 logits) runs
//! forward and backward before the next starts, so the `[rows, vocab]` logits of a
//! fully supervised long document are never held at once: at 32k rows and Qwen2's
//! vocabulary they would be 19.9 GB in f32, plus their log-softmax and gradient. The
//! slices' parameter gradients add up in the step's gradients, their row gradients
//! are written back into a gradient of the whole output. Slicing does not change
//! the result beyond the order of f32 sums (test
//! `remat::head::tests::slices_give_the_whole_loss_and_gradients`).

use burn::optim::GradientsParams;
use burn::tensor::{IndexingUpdateOp, Int, Tensor, TensorData};
use longview_models::vila::SupervisedRows;
use longview_models::{ModelError, Vlm};

use super::stack::{grad_or_zeros, take_grads};
use crate::error::TrainError;

/// The head's backward from the last text layer's output (untracked): the summed
/// loss of `supervised` divided by `normaliser`, the norm's and the head's (or tied
/// embeddings') gradients added into `into`. Returns the loss and the gradient of
/// `hidden` (zero on unsupervised rows).
///
/// # Shapes
/// - hidden: `[batch, seq, text_hidden]`; output gradient: the same
pub(crate) fn head_backward(
    model: &Vlm,
    hidden: Tensor<3>,
    supervised: &SupervisedRows,
    normaliser: f32,
    into: &mut GradientsParams,
) -> Result<(f32, Tensor<3>), TrainError> {
    head_backward_in_slices(
        model,
        hidden,
        supervised,
        normaliser,
        model.loss_chunk_rows(),
        into,
    )
}

fn head_backward_in_slices(
    model: &Vlm,
    hidden: Tensor<3>,
    supervised: &SupervisedRows,
    normaliser: f32,
    slice_rows: usize,
    into: &mut GradientsParams,
) -> Result<(f32, Tensor<3>), TrainError> {
    let [batch, seq, width] = hidden.dims();
    let total = batch * seq;
    if let Some(bad) = supervised
        .rows
        .iter()
        .find(|&&row| row < 0 || row as usize >= total)
    {
        return Err(TrainError::from(ModelError::Input(format!(
            "supervised row {bad} is outside the {batch}x{seq} hidden states"
        ))));
    }
    let device = hidden.device();
    let flat = hidden.reshape([total, width]);
    let index = |rows: &[i64]| {
        Tensor::<1, Int>::from_data(TensorData::new(rows.to_vec(), [rows.len()]), &device)
    };
    let mut value = 0.0f32;
    let mut row_grads = Vec::new();
    let slice_rows = slice_rows.max(1);
    let n = supervised.len();
    for start in (0..n).step_by(slice_rows) {
        let end = (start + slice_rows).min(n);
        let leaf = flat
            .clone()
            .select(0, index(&supervised.rows[start..end]))
            .autodiff()
            .require_grad();
        let loss = model
            .rows_loss_sum(leaf.clone(), &supervised.targets[start..end])
            .div_scalar(normaliser);
        value += loss.clone().into_scalar::<f32>();
        let mut grads = loss.backward();
        take_grads(model, &mut grads, into);
        row_grads.push(grad_or_zeros(&leaf, &grads).inner().cast(flat.dtype()));
    }
    // The slices' row gradients written into the whole output's, once.
    let mut grad = Tensor::<2>::zeros([total, width], (&device, flat.dtype()));
    if !row_grads.is_empty() {
        grad = grad.select_assign(
            0,
            index(&supervised.rows),
            Tensor::cat(row_grads, 0),
            IndexingUpdateOp::Add,
        );
    }
    Ok((value, grad.reshape([batch, seq, width])))
}

#[cfg(test)]
mod tests {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::{Device, Distribution};
    use longview_models::vila::{IGNORE_INDEX, VlmConfig};

    use super::*;

    /// Largest |a - b| over max(|b|) of two gradients of one tensor.
    fn relative_error(got: Tensor<2>, want: Tensor<2>) -> f32 {
        let got: Vec<f32> = got.into_data().iter::<f32>().collect();
        let want: Vec<f32> = want.into_data().iter::<f32>().collect();
        let scale = want.iter().fold(1e-12f32, |m, x| m.max(x.abs()));
        got.iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs() / scale)
            .fold(0.0, f32::max)
    }

    /// Every 2-D parameter gradient of `got` against `want` (the head's: the norm is
    /// 1-D and is compared through the loss); returns how many were compared.
    fn compare_params(model: &Vlm, got: &GradientsParams, want: &GradientsParams) -> usize {
        struct Compare<'a>(&'a GradientsParams, &'a GradientsParams, usize);
        impl ModuleVisitor for Compare<'_> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                match (self.0.get::<D>(param.id), self.1.get::<D>(param.id)) {
                    (None, None) => {}
                    (Some(got), Some(want)) => {
                        let flat = |t: Tensor<D>| {
                            let n = t.shape().num_elements();
                            t.reshape([1, n])
                        };
                        let error = relative_error(flat(got), flat(want));
                        // f32 on the CPU; only the order of sums differs.
                        assert!(
                            error <= 1e-5,
                            "parameter {:?}: error {error:.2e}",
                            param.shape()
                        );
                        self.2 += 1;
                    }
                    (got, _) => panic!(
                        "parameter {:?}: gradient only in the {}",
                        param.shape(),
                        if got.is_some() { "slices" } else { "reference" }
                    ),
                }
            }
        }
        let mut compare = Compare(got, want, 0);
        model.visit(&mut compare);
        compare.2
    }

    fn check(tied: bool) {
        let device = Device::flex().autodiff();
        let mut config = VlmConfig::debug();
        config.text.tie_word_embeddings = tied;
        let model = config.init(&device);
        let (batch, seq, width) = (2, 9, config.text.hidden_size);
        let hidden =
            Tensor::<3>::random([batch, seq, width], Distribution::Normal(0.0, 1.0), &device)
                .inner();
        // Labels aligned with the inputs; some rows unsupervised, some targets repeat.
        let vocab = config.text.vocab_size as i64;
        let labels: Vec<i64> = (0..(batch * seq) as i64)
            .map(|i| {
                if i % 4 == 1 {
                    IGNORE_INDEX
                } else {
                    (i * 37 + 5) % vocab
                }
            })
            .collect();
        let labels = Tensor::<2, Int>::from_data(TensorData::new(labels, [batch, seq]), &device);
        let normaliser = 7.0;

        // Reference: the whole supervised set in one autodiff graph.
        let leaf = hidden.clone().autodiff().require_grad();
        let (sum, count) = model.next_token_loss_sum(leaf.clone(), &labels).unwrap();
        let loss = sum.div_scalar(normaliser);
        let want_loss = loss.clone().into_scalar::<f32>();
        let grads = loss.backward();
        let want_hidden = leaf.grad(&grads).unwrap();
        let want_params = GradientsParams::from_grads(grads, &model);

        let supervised = SupervisedRows::of(&labels, 1).unwrap();
        assert_eq!(supervised.len(), count);
        for slice in [1, 3, count - 1, count, 10 * count] {
            let mut into = GradientsParams::new();
            let (got_loss, got_hidden) = head_backward_in_slices(
                &model,
                hidden.clone(),
                &supervised,
                normaliser,
                slice,
                &mut into,
            )
            .unwrap();
            assert!(
                (got_loss - want_loss).abs() <= 1e-5 * want_loss.abs(),
                "slices of {slice}: loss {got_loss} vs {want_loss}"
            );
            let error = relative_error(
                got_hidden.reshape([batch * seq, width]),
                want_hidden.clone().reshape([batch * seq, width]),
            );
            assert!(
                error <= 1e-5,
                "slices of {slice}: hidden gradient error {error:.2e}"
            );
            // Norm weight + head (untied) or norm weight + embeddings (tied).
            assert_eq!(
                compare_params(&model, &into, &want_params),
                2,
                "slices of {slice}"
            );
        }
    }

    #[test]
    fn slices_give_the_whole_loss_and_gradients() {
        check(false);
    }

    #[test]
    fn slices_of_a_tied_head_give_the_whole_gradients() {
        check(true);
    }

    #[test]
    fn qwen2_vocabulary_slices_hold_a_gib_of_logits() {
        let rows = longview_models::vila::loss::loss_chunk_rows(151_936);
        assert_eq!(rows, 1766);
        assert!(rows * 151_936 * 4 <= 1 << 30);
    }
}
