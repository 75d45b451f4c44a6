//! Which tokens of the global sequence each rank holds, and the helpers that cut
//! tokens, positions and labels accordingly (torchtitan's
//! `prepare_context_parallel_input`).
//!
//! Labels are shifted on the global sequence before sharding ([`shift_labels`]), so no
//! target is lost at a shard boundary (a peer defect: shifting per shard drops one
//! target per boundary); the loss is then normalised by the global count of supervised
//! tokens.

use std::ops::Range;

use burn::tensor::kind::Basic;
use burn::tensor::{Int, Tensor, TensorData};

use crate::{ParallelError, Result};

/// Label value the loss ignores (Hugging Face's `IGNORE_INDEX`).
pub const IGNORE_INDEX: i64 = -100;

/// How the global sequence is cut across the ranks of a sequence-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqLayout {
    /// Rank `r` holds the `r`-th of `P` equal pieces.
    Contiguous,
    /// The sequence is cut into `2P` chunks; rank `r` holds chunks `r` and `2P-1-r`, so
    /// every rank does the same causal work (ring attention's load balance).
    Zigzag,
    /// 2D attention over `P = ulysses x ring` ranks, Ulysses groups being contiguous
    /// ranks: the zigzag chunk pair of ring position `j = rank / ulysses` is taken
    /// first, then cut into `ulysses` contiguous pieces; rank `j * ulysses + u` holds
    /// piece `u`. The Ulysses all-to-all therefore reassembles exactly the zigzag pair.
    TwoD { ulysses: usize },
}

impl std::fmt::Display for SeqLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SeqLayout::Contiguous => write!(f, "contiguously"),
            SeqLayout::Zigzag => write!(f, "zigzag"),
            SeqLayout::TwoD { ulysses } => write!(f, "2D (Ulysses {ulysses} x zigzag ring)"),
        }
    }
}

impl SeqLayout {
    /// The global token ranges rank `rank` of `world` holds, in the order they are
    /// stored locally.
    pub fn ranges(self, len: usize, rank: usize, world: usize) -> Result<Vec<Range<usize>>> {
        let multiple = match self {
            SeqLayout::Contiguous => world,
            SeqLayout::Zigzag => 2 * world,
            SeqLayout::TwoD { ulysses } => {
                if ulysses == 0 || !world.is_multiple_of(ulysses) {
                    return Err(ParallelError::Shape {
                        what: "2D layout",
                        reason: format!(
                            "the Ulysses degree {ulysses} must divide the {world} ranks"
                        ),
                    });
                }
                // Each zigzag chunk pair (2 chunks of len / (2 * ring)) is cut `ulysses`
                // ways.
                2 * world
            }
        };
        if !len.is_multiple_of(multiple) {
            return Err(ParallelError::Length {
                len,
                layout: self.to_string(),
                ranks: world,
                multiple,
            });
        }
        Ok(match self {
            SeqLayout::Contiguous => {
                let n = len / world;
                std::iter::once(rank * n..(rank + 1) * n).collect()
            }
            SeqLayout::Zigzag => zigzag_pair(len, rank, world).to_vec(),
            SeqLayout::TwoD { ulysses } => {
                let ring = world / ulysses;
                let [first, second] = zigzag_pair(len, rank / ulysses, ring);
                let piece = 2 * first.len() / ulysses;
                let (from, to) = ((rank % ulysses) * piece, (rank % ulysses + 1) * piece);
                // Local offsets [from, to) into the concatenation first ++ second.
                let chunk = first.len();
                let mut out = Vec::new();
                if from < chunk {
                    out.push(first.start + from..first.start + to.min(chunk));
                }
                if to > chunk {
                    out.push(second.start + from.max(chunk) - chunk..second.start + to - chunk);
                }
                out
            }
        })
    }

    /// Global positions (for RoPE) of the tokens rank `rank` holds, in local order.
    pub fn positions(self, len: usize, rank: usize, world: usize) -> Result<Vec<usize>> {
        Ok(self
            .ranges(len, rank, world)?
            .into_iter()
            .flatten()
            .collect())
    }
}

fn zigzag_pair(len: usize, rank: usize, world: usize) -> [Range<usize>; 2] {
    let chunk = len / (2 * world);
    let second = 2 * world - 1 - rank;
    [
        rank * chunk..(rank + 1) * chunk,
        second * chunk..(second + 1) * chunk,
    ]
}

/// This rank's shard of `x` along `dim` (tokens, positions, labels, activations).
pub fn shard<const D: usize, K: Basic>(
    x: Tensor<D, K>,
    dim: usize,
    layout: SeqLayout,
    rank: usize,
    world: usize,
) -> Result<Tensor<D, K>> {
    let ranges = layout.ranges(x.dims()[dim], rank, world)?;
    let pieces: Vec<_> = ranges
        .into_iter()
        .map(|r| x.clone().narrow(dim, r.start, r.len()))
        .collect();
    Ok(if pieces.len() == 1 {
        pieces.into_iter().next().expect("one piece")
    } else {
        Tensor::cat(pieces, dim)
    })
}

/// Reassembles the global sequence from every rank's shard (`parts[r]` from rank `r`).
pub fn unshard<const D: usize, K: Basic>(
    parts: Vec<Tensor<D, K>>,
    dim: usize,
    layout: SeqLayout,
) -> Result<Tensor<D, K>> {
    let world = parts.len();
    let len: usize = parts.iter().map(|p| p.dims()[dim]).sum();
    let mut pieces = Vec::new();
    for (rank, part) in parts.into_iter().enumerate() {
        let mut at = 0;
        for range in layout.ranges(len, rank, world)? {
            pieces.push((range.start, part.clone().narrow(dim, at, range.len())));
            at += range.len();
        }
        if at != part.dims()[dim] {
            return Err(ParallelError::Shape {
                what: "unshard",
                reason: format!(
                    "rank {rank} passed {} tokens, the {layout} layout gives it {at}",
                    part.dims()[dim]
                ),
            });
        }
    }
    pieces.sort_by_key(|(start, _)| *start);
    Ok(Tensor::cat(
        pieces.into_iter().map(|(_, p)| p).collect(),
        dim,
    ))
}

/// Next-token targets of a global `[batch, seq]` label tensor: position `t` is
/// supervised by `labels[t + 1]`, the last position by nothing ([`IGNORE_INDEX`]).
/// Call it before [`shard`], never on shards.
pub fn shift_labels(labels: Tensor<2, Int>) -> Tensor<2, Int> {
    let [batch, seq] = labels.dims();
    let device = labels.device();
    let tail = Tensor::<2, Int>::from_data(
        TensorData::new(vec![IGNORE_INDEX; batch], [batch, 1]),
        &device,
    );
    if seq == 0 {
        return labels;
    }
    Tensor::cat(vec![labels.narrow(1, 1, seq - 1), tail], 1)
}

/// Number of supervised targets (labels other than [`IGNORE_INDEX`]). Sum it over the
/// ranks (all-reduce) and divide the summed per-token losses by the global count.
pub fn count_supervised(labels: &Tensor<2, Int>) -> usize {
    labels
        .to_data()
        .iter::<i64>()
        .filter(|&l| l != IGNORE_INDEX)
        .count()
}
