//! 2D attention (LongVILA's MM-SP attention, USP): `P = ulysses x ring` ranks; Ulysses
//! all-to-all inside groups of `ulysses` contiguous ranks (one node, fast links), a
//! zigzag ring across the `ring` groups (strided ranks, slower links).
//! docs/algorithms.md section 4.
//!
//! Tokens are laid out by [`SeqLayout::TwoD`]: the zigzag chunk pair of ring position
//! `j` is taken first and then cut `ulysses` ways, so the Ulysses exchange inside node
//! `j` reassembles exactly that pair, which the zigzag ring then treats as its shard.
//! (Splitting first and pairing second, as the public VILA code does, hands the ring
//! token sets that are not zigzag pairs.)

use burn::tensor::{Int, Tensor};
use longview_comm::Communicator;

use crate::layout::SeqLayout;
use crate::ring::{RingAttention, RingBalance};
use crate::ulysses::{self, HeadShardAttention};
use crate::{ParallelError, Result};

/// The two sub-groups a rank belongs to in 2D attention.
pub struct TwoDGroups<C> {
    /// Contiguous ranks `j * ulysses .. (j + 1) * ulysses`.
    pub ulysses: C,
    /// Strided ranks `u, u + ulysses, u + 2 * ulysses, ...`.
    pub ring: C,
}

impl<C: Communicator> TwoDGroups<C> {
    /// Splits `comm` (every rank calls this with the same `ulysses`).
    pub fn new(comm: &C, ulysses: usize) -> Result<Self> {
        let world = comm.world_size();
        if ulysses == 0 || !world.is_multiple_of(ulysses) {
            return Err(ParallelError::Shape {
                what: "2D attention",
                reason: format!("the Ulysses degree {ulysses} must divide the {world} ranks"),
            });
        }
        let ring = world / ulysses;
        let ulysses_groups: Vec<Vec<usize>> = (0..ring)
            .map(|j| (j * ulysses..(j + 1) * ulysses).collect())
            .collect();
        let ring_groups: Vec<Vec<usize>> = (0..ulysses)
            .map(|u| (0..ring).map(|j| j * ulysses + u).collect())
            .collect();
        Ok(Self {
            ulysses: comm.split(&ulysses_groups)?,
            ring: comm.split(&ring_groups)?,
        })
    }

    /// The layout the tokens must be sharded with.
    pub fn layout(&self) -> SeqLayout {
        SeqLayout::TwoD {
            ulysses: self.ulysses.world_size(),
        }
    }
}

/// 2D attention settings; the same on every rank.
#[derive(Debug, Clone, Copy)]
pub struct TwoDAttention {
    pub causal: bool,
    pub scale: f64,
}

struct Ring<'a, C> {
    comm: &'a C,
    ring: RingAttention,
}

impl<C: Communicator> HeadShardAttention for Ring<'_, C> {
    fn forward(
        &self,
        (q, k, v): (Tensor<4>, Tensor<4>, Tensor<4>),
        segments: Option<Tensor<2, Int>>,
    ) -> Result<(Tensor<4>, Tensor<3>)> {
        self.ring.forward_packed(self.comm, q, k, v, segments)
    }

    fn backward(
        &self,
        qkv: (Tensor<4>, Tensor<4>, Tensor<4>),
        lse: Tensor<3>,
        delta: Tensor<3>,
        d_o: Tensor<4>,
        segments: Option<Tensor<2, Int>>,
    ) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
        self.ring
            .backward_with_delta(self.comm, qkv, lse, delta, d_o, segments)
    }
}

impl TwoDAttention {
    fn inner<'a, C>(&self, groups: &'a TwoDGroups<C>) -> Ring<'a, C> {
        Ring {
            comm: &groups.ring,
            ring: RingAttention {
                balance: RingBalance::Zigzag,
                causal: self.causal,
                scale: self.scale,
            },
        }
    }

    /// This rank's `(O, LSE)` for its [`SeqLayout::TwoD`] shard (O in q's dtype).
    ///
    /// # Shapes
    /// - `q`: `[batch, q_heads, local_len, head_dim]`
    /// - `k`, `v`: `[batch, kv_heads, local_len, head_dim]`
    pub fn forward<C: Communicator>(
        &self,
        groups: &TwoDGroups<C>,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
    ) -> Result<(Tensor<4>, Tensor<3>)> {
        self.forward_packed(groups, q, k, v, None)
    }

    /// [`TwoDAttention::forward`] for packed batches: `segments` (`[batch, local_len]`,
    /// this rank's [`SeqLayout::TwoD`] shard) holds each token's sequence id.
    pub fn forward_packed<C: Communicator>(
        &self,
        groups: &TwoDGroups<C>,
        q: Tensor<4>,
        k: Tensor<4>,
        v: Tensor<4>,
        segments: Option<Tensor<2, Int>>,
    ) -> Result<(Tensor<4>, Tensor<3>)> {
        // Inside a node the pieces of the pair are contiguous.
        ulysses::forward_with(
            &groups.ulysses,
            SeqLayout::Contiguous,
            &self.inner(groups),
            (q, k, v),
            segments,
        )
    }

    /// This rank's `(dQ, dK, dV)` from the forward's O and LSE and the gradient `d_o`.
    pub fn backward<C: Communicator>(
        &self,
        groups: &TwoDGroups<C>,
        qkv: (Tensor<4>, Tensor<4>, Tensor<4>),
        o: Tensor<4>,
        lse: Tensor<3>,
        d_o: Tensor<4>,
    ) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
        self.backward_packed(groups, qkv, o, lse, d_o, None)
    }

    /// [`TwoDAttention::backward`] for packed batches.
    pub fn backward_packed<C: Communicator>(
        &self,
        groups: &TwoDGroups<C>,
        qkv: (Tensor<4>, Tensor<4>, Tensor<4>),
        o: Tensor<4>,
        lse: Tensor<3>,
        d_o: Tensor<4>,
        segments: Option<Tensor<2, Int>>,
    ) -> Result<(Tensor<4>, Tensor<4>, Tensor<4>)> {
        let dtypes = (qkv.0.dtype(), qkv.1.dtype(), qkv.2.dtype());
        let (d_q, d_k, d_v) = ulysses::backward_with(
            &groups.ulysses,
            SeqLayout::Contiguous,
            &self.inner(groups),
            qkv,
            o,
            lse,
            d_o,
            segments,
        )?;
        Ok((d_q.cast(dtypes.0), d_k.cast(dtypes.1), d_v.cast(dtypes.2)))
    }
}
