//! When the tensor-core kernels can run ([`tensor_cores_unsupported`]) and with which
//! tile sizes ([`TcTiles`]: chosen by a sweep, shrunk to the device's shared memory,
//! `LONGVIEW_FLASH_TILES` for exploration).

use cubecl::prelude::*;

use super::DeviceTensor;

/// Tile sizes of the tensor-core kernels: planes per cube of the forward / dQ
/// (16 query rows each for dQ, `16 fwd_m_tiles` for the forward), keys per shared tile
/// of the forward and of dQ, planes per cube of dK/dV (16 key rows each) and query rows
/// per tile of dK/dV; whether the forward issues the next tile's loads after its
/// scores, and whether it keeps Q in shared memory rather than registers.
/// `LONGVIEW_FLASH_TILES="fw,fk,qk,kw,kq[,fm[,late[,qs]]]"` overrides them (benchmark
/// exploration; `fm` row blocks of 16 a forward plane, `late` and `qs` 0 or 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct TcTiles {
    pub(super) fwd_warps: usize,
    pub(super) fwd_block_k: usize,
    pub(super) fwd_m_tiles: usize,
    pub(super) fwd_late_prefetch: bool,
    pub(super) fwd_q_shared: bool,
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
        let q_rows = self.fwd_warps * 16 * self.fwd_m_tiles;
        let fwd = if self.fwd_q_shared {
            q_rows * row + 4 * self.fwd_block_k * row
        } else {
            q_rows.max(2 * self.fwd_block_k) * row + 2 * self.fwd_block_k * row
        };
        let dq = 2 * (self.fwd_warps * 16).max(2 * self.dq_block_k) * row;
        // dK/dV also holds the fused dQ's dS tile (block_q x (keys + 8) elements) and
        // its f32 dQ tile (block_q x (padded + 4)).
        let dkdv = 2 * self.dkdv_warps * 16 * row
            + 4 * self.dkdv_block_q * (row + 4)
            + self.dkdv_block_q * (self.dkdv_warps * 16 + 8) * 2
            + self.dkdv_block_q * (d.div_ceil(16) * 16 + 4) * 4;
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
    tc_tiles_requested().0.fitting(d, budget)
}

/// The default tiles, chosen by sweeps on an H100 (B1 H16 S32768 D128 causal bf16,
/// benchmarks/flash_attention.md, 2026-12-06): the forward runs 4 planes of two row
/// blocks (128 query rows a cube) with Q in shared memory, 32 keys a tile and the next
/// tile's loads issued after the scores: 185.1 TFLOP/s against 164.5 for the tiles
/// before (8 planes of one block, 64 keys, Q in registers, early loads) in one call.
/// With Q in registers two row blocks spilled and were slower (100-150 TFLOP/s).
/// dK/dV takes query tiles of 64 rows since its tiles are staged by `cp.async`
/// (session 26, same shape, H100, one call: 230.3 TFLOP/s fwd+bwd against 223.7 with
/// tiles of 32 and 224.5 with 48; 211.8 for tiles of 32 staged through registers).
const DEFAULT_TILES: TcTiles = TcTiles {
    fwd_warps: 4,
    fwd_block_k: 32,
    fwd_m_tiles: 2,
    fwd_late_prefetch: true,
    fwd_q_shared: true,
    dq_block_k: 32,
    dkdv_warps: 8,
    dkdv_block_q: 64,
};

/// The forward's tiles for launches of fewer cubes than the device has
/// multiprocessors (one decoding row a head walking the whole cache, a few short
/// sequences): twice the planes a cube, one row block each. In the same call as
/// above, the plain tensor-core forward of one decoding row over 200k keys (12 cubes)
/// took 12.4 ms with [`DEFAULT_TILES`], against 6.8 ms for the 8-plane, one-block
/// kernel (early loads) in the earlier run that day (flash_attention.md).
const FEW_CUBES_FORWARD: TcTiles = TcTiles {
    fwd_warps: 8,
    fwd_block_k: 64,
    fwd_m_tiles: 1,
    fwd_late_prefetch: true,
    fwd_q_shared: false,
    ..DEFAULT_TILES
};

/// Most query rows a head of a launch that takes [`FEW_ROWS_FORWARD`]: a decoding step
/// on the tensor cores, whose rows are one kv head's query heads times the step's
/// positions (at most the decode kernels' 32).
const FEW_ROWS: usize = 32;

/// The forward's tiles for launches of at most [`FEW_ROWS`] query rows a head and at
/// least one cube a multiprocessor (decoding with the keys sliced into the batch): one
/// cube's rows are a block of 32, not the 128 of [`DEFAULT_TILES`], whose other planes
/// would compute on padding; two planes share each K/V tile's loads.
const FEW_ROWS_FORWARD: TcTiles = TcTiles {
    fwd_warps: 2,
    fwd_block_k: 32,
    fwd_m_tiles: 1,
    fwd_late_prefetch: true,
    fwd_q_shared: false,
    ..DEFAULT_TILES
};

/// The forward's tiles for `sq` query rows in each of `heads` (`B * Hq`) sequences:
/// [`tc_tiles`], unless that launch would have fewer cubes than the device has
/// multiprocessors and no valid `LONGVIEW_FLASH_TILES` is set; then
/// [`FEW_CUBES_FORWARD`]; at most [`FEW_ROWS`] rows a head otherwise,
/// [`FEW_ROWS_FORWARD`], or the forward's part of `LONGVIEW_DECODE_TC_TILES` (the same
/// format as `LONGVIEW_FLASH_TILES`, for benchmarks of the decoding step alone).
pub(super) fn tc_forward_tiles(client: &Client, d: usize, sq: usize, heads: usize) -> TcTiles {
    let budget = client.properties().hardware.max_shared_memory_size;
    let sms = client
        .properties()
        .hardware
        .num_streaming_multiprocessors
        .unwrap_or(64) as usize;
    let (requested, explicit) = tc_tiles_requested();
    let few_rows = if sq <= FEW_ROWS {
        decode_tiles_requested()
    } else {
        None
    };
    let tiles = match few_rows {
        Some(asked) => with_forward_of(requested, asked),
        None => forward_tiles_for(requested, explicit, sq, heads, sms),
    };
    tiles.fitting(d, budget)
}

/// `tiles` with the forward's settings of `forward`.
fn with_forward_of(tiles: TcTiles, forward: TcTiles) -> TcTiles {
    TcTiles {
        dq_block_k: tiles.dq_block_k,
        dkdv_warps: tiles.dkdv_warps,
        dkdv_block_q: tiles.dkdv_block_q,
        ..forward
    }
}

fn forward_tiles_for(
    requested: TcTiles,
    explicit: bool,
    sq: usize,
    heads: usize,
    sms: usize,
) -> TcTiles {
    let cubes = sq.div_ceil(16 * requested.fwd_m_tiles * requested.fwd_warps) * heads;
    if explicit {
        return requested;
    }
    if cubes < sms {
        return with_forward_of(requested, FEW_CUBES_FORWARD);
    }
    if sq <= FEW_ROWS {
        return with_forward_of(requested, FEW_ROWS_FORWARD);
    }
    requested
}

/// `LONGVIEW_DECODE_TC_TILES`, parsed once.
fn decode_tiles_requested() -> Option<TcTiles> {
    static REQUESTED: std::sync::OnceLock<Option<TcTiles>> = std::sync::OnceLock::new();
    *REQUESTED.get_or_init(|| tiles_from_env("LONGVIEW_DECODE_TC_TILES"))
}

/// The tiles asked for, and whether `LONGVIEW_FLASH_TILES` set them (a setting that
/// does not parse is reported and ignored: the defaults apply whole).
fn tc_tiles_requested() -> (TcTiles, bool) {
    static REQUESTED: std::sync::OnceLock<(TcTiles, bool)> = std::sync::OnceLock::new();
    *REQUESTED.get_or_init(|| match tiles_from_env("LONGVIEW_FLASH_TILES") {
        Some(tiles) => (tiles, true),
        None => (DEFAULT_TILES, false),
    })
}

/// A tile setting from the environment variable `name`, read once per process by the
/// callers; one that does not parse is reported and ignored (`None`, as when unset).
fn tiles_from_env(name: &str) -> Option<TcTiles> {
    let text = std::env::var(name).ok()?;
    match parse_tiles(&text) {
        Ok(tiles) => Some(tiles),
        Err(why) => {
            eprintln!("{name}={text:?} ignored: {why}");
            None
        }
    }
}

/// `fw,fk,qk,kw,kq[,fm[,late[,qs]]]` (see [`TcTiles`]). Left out, the forward's
/// options are those of the kernel before they existed (one row block, early loads,
/// Q in registers: `fm=1, late=0, qs=0`), so that five-value settings written down
/// earlier keep their meaning.
fn parse_tiles(text: &str) -> Result<TcTiles, String> {
    const WANT: &str = "want fw,fk,qk,kw,kq[,fm[,late[,qs]]]: positive numbers with fk, qk, \
                        kq multiples of 16, fm 1 or 2, late and qs 0 or 1";
    let v = text
        .split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| WANT.to_string())?;
    let ok = (5..=8).contains(&v.len())
        && v[..5].iter().all(|&x| x > 0)
        && v[1].is_multiple_of(16)
        && v[2].is_multiple_of(16)
        && v[4].is_multiple_of(16)
        && v.get(5).is_none_or(|&m| (1..=2).contains(&m))
        && v.iter().skip(6).all(|&flag| flag <= 1);
    if !ok {
        return Err(WANT.to_string());
    }
    Ok(TcTiles {
        fwd_warps: v[0],
        fwd_block_k: v[1],
        fwd_m_tiles: v.get(5).copied().unwrap_or(1),
        fwd_late_prefetch: v.get(6).is_some_and(|&x| x == 1),
        fwd_q_shared: v.get(7).is_some_and(|&x| x == 1),
        dq_block_k: v[2],
        dkdv_warps: v[3],
        dkdv_block_q: v[4],
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_settings_parse_strictly() {
        let t = parse_tiles("4, 32,32,8,32,2,1,1").unwrap();
        assert!(t.fwd_q_shared);
        let t = parse_tiles("4, 32,32,8,32,2,1").unwrap();
        assert!(!t.fwd_q_shared);
        assert_eq!((t.fwd_warps, t.fwd_block_k, t.dq_block_k), (4, 32, 32));
        assert_eq!((t.dkdv_warps, t.dkdv_block_q), (8, 32));
        assert_eq!((t.fwd_m_tiles, t.fwd_late_prefetch), (2, true));
        let t = parse_tiles("8,64,32,8,32").unwrap();
        assert_eq!(
            (t.fwd_m_tiles, t.fwd_late_prefetch, t.fwd_q_shared),
            (1, false, false)
        );
        for bad in [
            "8,64,32,8",            // too few
            "8,64,32,8,32,1,0,1,1", // too many
            "8,64,32,8,32,1,0,2",   // Q placement 2
            "8,64,32,8,32,foo",     // not a number
            "8,60,32,8,32",         // keys not a multiple of 16
            "0,64,32,8,32",         // no planes
            "8,64,32,8,32,3",       // three row blocks
            "8,64,32,8,32,1,2",     // load order 2
        ] {
            assert!(parse_tiles(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn few_cubes_take_the_wider_forward_tiles() {
        let sms = 132;
        // 32k causal, 16 heads: 256 blocks of 128 rows a head.
        let t = forward_tiles_for(DEFAULT_TILES, false, 32768, 16, sms);
        assert_eq!((t.fwd_warps, t.fwd_m_tiles, t.fwd_q_shared), (4, 2, true));
        // A decoding row a head over the whole cache: 12 cubes.
        let t = forward_tiles_for(DEFAULT_TILES, false, 1, 12, sms);
        assert_eq!((t.fwd_warps, t.fwd_m_tiles, t.fwd_q_shared), (8, 1, false));
        assert_eq!(t.fwd_block_k, 64);
        // The other kernels' tiles are left alone.
        let asked = TcTiles {
            dq_block_k: 64,
            dkdv_warps: 4,
            dkdv_block_q: 16,
            ..DEFAULT_TILES
        };
        let few = forward_tiles_for(asked, false, 1, 12, sms);
        assert_eq!(
            (few.dq_block_k, few.dkdv_warps, few.dkdv_block_q),
            (64, 4, 16)
        );
        // An explicit LONGVIEW_FLASH_TILES is taken as given.
        let t = forward_tiles_for(DEFAULT_TILES, true, 1, 12, sms);
        assert_eq!((t.fwd_warps, t.fwd_m_tiles), (4, 2));
        // Exactly one cube a multiprocessor keeps the default.
        let t = forward_tiles_for(DEFAULT_TILES, false, 128 * 11, 12, sms);
        assert_eq!(t.fwd_warps, 4);
    }

    #[test]
    fn decoding_slices_take_the_few_rows_tiles() {
        let sms = 132;
        // The 1.5B's decoding step folded to 2 kv heads of 6 rows, 132 slices each.
        let t = forward_tiles_for(DEFAULT_TILES, false, 6, 264, sms);
        assert_eq!(t, with_forward_of(DEFAULT_TILES, FEW_ROWS_FORWARD));
        assert_eq!(16 * t.fwd_warps * t.fwd_m_tiles, FEW_ROWS);
        // 33 rows are a prefill chunk's business: the defaults.
        assert_eq!(
            forward_tiles_for(DEFAULT_TILES, false, 33, 264, sms),
            DEFAULT_TILES
        );
        // Few cubes win over few rows; an explicit setting over both.
        let t = forward_tiles_for(DEFAULT_TILES, false, 6, 12, sms);
        assert_eq!(t.fwd_warps, FEW_CUBES_FORWARD.fwd_warps);
        assert_eq!(
            forward_tiles_for(DEFAULT_TILES, true, 6, 264, sms),
            DEFAULT_TILES
        );
        // The few-rows tiles fit at every head dim unshrunk.
        let few = with_forward_of(DEFAULT_TILES, FEW_ROWS_FORWARD);
        for d in [64, 72, 80, 128] {
            assert_eq!(few.fitting(d, 227 << 10), few, "head dim {d}");
        }
    }

    #[test]
    fn the_defaults_fit_an_h100_or_h200_unshrunk() {
        // 227 KiB of shared memory a cube on both (sm_90). The tiles were chosen by
        // sweeps there: a kernel that grows its shared memory past this budget would
        // silently run smaller tiles.
        let budget = 227 << 10;
        for d in [64, 72, 80, 128] {
            assert_eq!(
                DEFAULT_TILES.fitting(d, budget),
                DEFAULT_TILES,
                "head dim {d}"
            );
        }
        // dK/dV at D128 took 113,664 bytes before its f32 dQ tile (Nsight Compute,
        // 2026-12-06); the estimate must count that tile (32 x 128 f32) on top.
        assert!(DEFAULT_TILES.shared_bytes(128) >= 113_664 + 32 * 128 * 4);
    }

    #[test]
    fn shrinking_keeps_the_forward_row_blocks_inside_the_budget() {
        for m_tiles in [1, 2] {
            let tiles = TcTiles {
                fwd_warps: 16,
                fwd_m_tiles: m_tiles,
                ..DEFAULT_TILES
            };
            // 16 planes of 32 rows stage 512 Q rows of 272 bytes: 139 KiB alone.
            assert!(tiles.shared_bytes(128) >= 16 * 16 * m_tiles * 272 + 2 * 64 * 272);
            for budget in [48 << 10, 100 << 10, 228 << 10] {
                let fitted = tiles.fitting(128, budget);
                assert!(fitted.shared_bytes(128) <= budget, "{m_tiles} {budget}");
                assert_eq!(fitted.fwd_m_tiles, m_tiles);
            }
        }
    }
}
