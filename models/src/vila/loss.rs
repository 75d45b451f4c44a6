//! Stage 6 as training uses it: the final norm, the LM head and the cross entropy on
//! the rows whose next token is supervised, never on the whole sequence.
//!
//! A long video with a short answer supervises a handful of rows, so computing the
//! head on those rows only saves the `[seq, vocab]` logits. A long text document
//! (stage 4, context extension) supervises every row: at 32k rows and Qwen2's 151,936
//! vocabulary the f32 logits alone are 19.9 GB, and their log-softmax and gradient as
//! much again. The trainer therefore asks for the supervised rows
//! ([`SupervisedRows`]) and runs [`Qwen2::rows_loss_sum`] on slices of at most
//! [`loss_chunk_rows`] of them, back-propagating each slice before the next
//! (`longview-train`'s `remat::head`).

use burn::tensor::{DType, Int, Tensor, TensorData};

use super::text::Qwen2;
use super::{IGNORE_INDEX, token_cross_entropy_sum};
use crate::error::ModelError;

/// f32 logits a loss slice may hold: 2^28 elements (1 GiB). The slice's log-softmax
/// and its gradient are as large again, so a slice's head costs about 4 GiB at most.
pub const LOSS_CHUNK_LOGITS: usize = 1 << 28;

/// Rows of one loss slice for a vocabulary of `vocab` tokens (at least one row).
/// Qwen2's 151,936 tokens give 1,766 rows; the debug model's whole batch fits in one.
pub fn loss_chunk_rows(vocab: usize) -> usize {
    (LOSS_CHUNK_LOGITS / vocab.max(1)).max(1)
}

/// The rows of a `[batch, seq]` layout whose next token is supervised.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SupervisedRows {
    /// Flat row indices `b * seq + t` into the hidden states, in order.
    pub rows: Vec<i64>,
    /// The token each of those rows predicts.
    pub targets: Vec<i64>,
}

impl SupervisedRows {
    /// The rows `t` whose `labels[b, t + shift]` is supervised (not [`IGNORE_INDEX`]):
    /// `shift = 1` for labels aligned with the inputs, `0` for targets already
    /// shifted (a sequence-parallel shard's). Reads the labels on the host.
    ///
    /// # Shapes
    /// - labels: `[batch, seq]`
    pub fn of(labels: &Tensor<2, Int>, shift: usize) -> Result<Self, ModelError> {
        let [batch, seq] = labels.dims();
        let host = labels
            .clone()
            .try_into_vec_as::<i64>()
            .map_err(|e| ModelError::Input(format!("cannot read labels: {e:?}")))?;
        let mut out = SupervisedRows::default();
        for b in 0..batch {
            for t in 0..seq.saturating_sub(shift) {
                let target = host[b * seq + t + shift];
                if target != IGNORE_INDEX {
                    out.rows.push((b * seq + t) as i64);
                    out.targets.push(target);
                }
            }
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

impl Qwen2 {
    /// Summed next-token cross entropy and the supervised count, like
    /// [`causal_lm_loss_sum`](super::causal_lm_loss_sum) over
    /// `lm_head(norm(hidden))`, but the final norm and the LM head run on the rows
    /// whose next token is supervised only. Reads the labels on the host.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq, hidden]` (the last decoder layer's output, before the
    ///   final norm); labels: `[batch, seq]`, aligned with the inputs
    pub fn next_token_loss_sum(
        &self,
        hidden: Tensor<3>,
        labels: &Tensor<2, Int>,
    ) -> Result<(Tensor<1>, usize), ModelError> {
        self.supervised_loss_sum(hidden, labels, 1)
    }

    /// Like [`next_token_loss_sum`](Self::next_token_loss_sum) for targets already
    /// shifted: `targets[b, t]` is the token position `t` predicts (`IGNORE_INDEX` where
    /// none), as a sequence-parallel rank holds them for its shard.
    ///
    /// # Shapes
    /// - hidden: `[batch, seq, hidden]`; targets: `[batch, seq]`
    pub fn shifted_loss_sum(
        &self,
        hidden: Tensor<3>,
        targets: &Tensor<2, Int>,
    ) -> Result<(Tensor<1>, usize), ModelError> {
        self.supervised_loss_sum(hidden, targets, 0)
    }

    fn supervised_loss_sum(
        &self,
        hidden: Tensor<3>,
        labels: &Tensor<2, Int>,
        shift: usize,
    ) -> Result<(Tensor<1>, usize), ModelError> {
        let [batch, seq, width] = hidden.dims();
        if labels.dims() != [batch, seq] {
            return Err(ModelError::Input(format!(
                "labels are {:?} but the hidden states are {:?}",
                labels.dims(),
                hidden.dims()
            )));
        }
        let supervised = SupervisedRows::of(labels, shift)?;
        if supervised.is_empty() {
            // Zero, but connected to `hidden`: a backward pass still walks every layer
            // (a sequence-parallel rank without supervised rows must still take part in
            // its layers' collectives).
            return Ok((hidden.sum().mul_scalar(0.0).cast(DType::F32), 0));
        }
        let device = hidden.device();
        let n = supervised.len();
        let rows = Tensor::<1, Int>::from_data(TensorData::new(supervised.rows, [n]), &device);
        let picked = hidden.reshape([batch * seq, width]).select(0, rows);
        Ok((self.rows_loss_sum(picked, &supervised.targets), n))
    }

    /// Summed cross entropy of `lm_head(norm(rows))` against `targets`, one target
    /// per row (none ignored).
    ///
    /// # Shapes
    /// - rows: `[n, hidden]` (last decoder layer's output); output: `[1]` (f32)
    pub fn rows_loss_sum(&self, rows: Tensor<2>, targets: &[i64]) -> Tensor<1> {
        let [n, width] = rows.dims();
        assert_eq!(n, targets.len(), "{n} rows but {} targets", targets.len());
        let device = rows.device();
        let logits = self.lm_head(super::text::rms_norm(
            &self.model.norm,
            rows.reshape([1, n, width]),
        ));
        let targets =
            Tensor::<2, Int>::from_data(TensorData::new(targets.to_vec(), [1, n]), &device);
        token_cross_entropy_sum(logits, targets).0
    }
}
