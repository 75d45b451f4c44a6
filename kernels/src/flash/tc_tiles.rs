//! When the tensor-core kernels can run ([`tensor_cores_unsupported`]) and with which
//! tile sizes ([`TcTiles`]: chosen by a sweep, shrunk to the device's shared memory,
//! `LONGVIEW_FLASH_TILES` for exploration).

use cubecl::prelude::*;

use super::DeviceTensor;

/// Tile sizes of the tensor-core kernels: planes per cube of the forward / dQ
/// (16 query rows each for dQ, `16 fwd_m_tiles` for the forward), keys per shared tile
/// of the forward and of dQ, planes per cube of dK/dV (16 key rows each) and query rows
/// per tile of dK/dV; whether the forward issues the next tile's loads after its
/// scores. `LONGVIEW_FLASH_TILES="fw,fk,qk,kw,kq[,fm[,late]]"` overrides them
/// (benchmark exploration; `fm` row blocks of 16 a forward plane, `late` 0 or 1).
#[derive(Clone, Copy, Debug)]
pub(super) struct TcTiles {
    pub(super) fwd_warps: usize,
    pub(super) fwd_block_k: usize,
    pub(super) fwd_m_tiles: usize,
    pub(super) fwd_late_prefetch: bool,
    pub(super) dq_block_k: usize,
    pub(super) dkdv_warps: usize,
    pub(super) dkdv_block_q: usize,
}

impl TcTiles {
    /// Shared-memory bytes of the largest of the three kernels at head dim `d`
    /// (rows of `padded + 8` 16-bit elements; two f32 per dK/dV query row).
    fn shared_bytes(&self, d: usize) -> usize {
        // K/V (forward, dQ) and Q/dO/LSE/delta (dK/dV) tiles are double-buffered.
        let row = (d.div_ceil(16) * 16 + 8) * 2;
        let fwd = (self.fwd_warps * 16 * self.fwd_m_tiles).max(2 * self.fwd_block_k) * row
            + 2 * self.fwd_block_k * row;
        let dq = 2 * (self.fwd_warps * 16).max(2 * self.dq_block_k) * row;
        // dK/dV also holds the fused dQ's dS tile (block_q x (keys + 8) elements).
        let dkdv = 2 * self.dkdv_warps * 16 * row
            + 4 * self.dkdv_block_q * (row + 4)
            + self.dkdv_block_q * (self.dkdv_warps * 16 + 8) * 2;
        fwd.max(dq).max(dkdv)
    }

    /// These tiles, shrunk until the kernels fit in `budget` bytes of shared memory
    /// (and dK/dV's query tile is at most its unit count: one LSE row per unit).
    fn fitting(mut self, d: usize, budget: usize) -> TcTiles {
        while self.dkdv_block_q > 32 * self.dkdv_warps && self.dkdv_block_q > 16 {
            self.dkdv_block_q /= 2;
        }
        while self.shared_bytes(d) > budget {
            if self.dkdv_block_q > 16 {
                self.dkdv_block_q /= 2;
            } else if self.fwd_warps > 1 || self.dkdv_warps > 1 {
                self.fwd_warps = (self.fwd_warps / 2).max(1);
                self.dkdv_warps = (self.dkdv_warps / 2).max(1);
            } else if self.fwd_block_k > 16 || self.dq_block_k > 16 {
                self.fwd_block_k = (self.fwd_block_k / 2).max(16);
                self.dq_block_k = (self.dq_block_k / 2).max(16);
            } else {
                break;
            }
        }
        self
    }
}

pub(super) fn tc_tiles(client: &Client, d: usize) -> TcTiles {
    let budget = client.properties().hardware.max_shared_memory_size;
    tc_tiles_requested().fitting(d, budget)
}

fn tc_tiles_requested() -> TcTiles {
    // Chosen by a sweep on an H100 (B1 H16 S32768 D128 causal bf16,
    // benchmarks/flash_attention.md).
    let default = TcTiles {
        fwd_warps: 8,
        fwd_block_k: 64,
        fwd_m_tiles: 1,
        fwd_late_prefetch: false,
        dq_block_k: 32,
        dkdv_warps: 8,
        dkdv_block_q: 32,
    };
    let Ok(text) = std::env::var("LONGVIEW_FLASH_TILES") else {
        return default;
    };
    let v: Vec<usize> = text
        .split(',')
        .filter_map(|x| x.trim().parse().ok())
        .collect();
    let ok = (5..=7).contains(&v.len())
        && v[..5].iter().all(|&x| x > 0)
        && v[1].is_multiple_of(16)
        && v[2].is_multiple_of(16)
        && v[4].is_multiple_of(16)
        && v.get(5).is_none_or(|&m| (1..=2).contains(&m))
        && v.get(6).is_none_or(|&late| late <= 1);
    if !ok {
        eprintln!(
            "LONGVIEW_FLASH_TILES={text:?} ignored: want fw,fk,qk,kw,kq[,fm[,late]]: positive numbers with fk, qk, kq multiples of 16, fm 1 or 2, late 0 or 1"
        );
        return default;
    }
    TcTiles {
        fwd_warps: v[0],
        fwd_block_k: v[1],
        fwd_m_tiles: v.get(5).copied().unwrap_or(default.fwd_m_tiles),
        fwd_late_prefetch: v.get(6).map_or(default.fwd_late_prefetch, |&x| x == 1),
        dq_block_k: v[2],
        dkdv_warps: v[3],
        dkdv_block_q: v[4],
    }
}

/// Largest head dimension of the tensor-core kernels (registers per lane).
pub const TC_MAX_HEAD_DIM: usize = 128;

/// Why the tensor-core kernels cannot run on these tensors, or `None` when they can:
/// the element type needs `mma` m16n8k16 and `ldmatrix` on the device (f16/bf16, CUDA
/// sm_80+), the head dim a multiple of 8 up to [`TC_MAX_HEAD_DIM`], every tensor
/// unit-stride along the head dim with other strides multiples of 8 (16-byte loads).
pub fn tensor_cores_unsupported<F: Float + CubeElement>(
    client: &Client,
    tensors: &[(&str, &DeviceTensor)],
) -> Option<String> {
    let elem = F::cube_type();
    if F::size_bits() != 16 {
        return Some(format!("{elem:?} is not a 16-bit float"));
    }
    let features = &client.features().matmul;
    let mma = cubecl::ir::features::MmaConfig {
        a_type: elem,
        b_type: elem,
        cd_type: f32::cube_type(),
        m: 16,
        n: 8,
        k: 16,
    };
    if !features.mma.contains(&mma) {
        return Some(format!("the device has no mma m16n8k16 for {elem:?}"));
    }
    if !features.ldmatrix.contains(&elem) {
        return Some(format!("the device has no ldmatrix for {elem:?}"));
    }
    let d = tensors
        .first()
        .and_then(|t| t.1.shape.last().copied())
        .unwrap_or(0);
    if !d.is_multiple_of(8) || d > TC_MAX_HEAD_DIM {
        return Some(format!(
            "head_dim {d} (needs a multiple of 8 up to {TC_MAX_HEAD_DIM})"
        ));
    }
    for &(name, t) in tensors {
        if t.strides.len() != 4 || t.strides[3] != 1 || t.strides[..3].iter().any(|s| s % 8 != 0) {
            return Some(format!(
                "{name} strides {:?} (needs unit stride along head_dim, others multiples of 8)",
                t.strides
            ));
        }
    }
    None
}
