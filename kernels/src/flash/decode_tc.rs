//! Decoding on the tensor cores: the keys cut into equal slices folded into the
//! batch, so that one launch of the tensor-core forward runs `slices x Hq` cubes where
//! a plain launch runs `Hq` (a decoding step has one block of query rows, and a plain
//! launch walks every key in one cube per head). Of the calls the decode kernels
//! take (at most [`super::DECODE_MAX_ROWS`] query rows a kv head), those whose query
//! heads fold into the kv heads' rows ([`grouped`]: each key then read once a kv head)
//! or with at least [`DECODE_TC_MIN_ROWS`] rows come here by default; larger calls run
//! the plain tensor-core forward as before. `LONGVIEW_DECODE_TENSOR_CORES=1`/`0` or
//! [`FlashOptions::tensor_core_decode`] forces the choice for the decode kernels' calls.
//!
//! No copy is made: k and v are read through a strided view `[slices, Hkv, sk /
//! slices, d]` of their buffer (the slice index steps `sk / slices` keys), q through
//! a view that repeats it with a zero batch stride. The keys past the last whole
//! slice run as one more launch on a view offset into the same K/V buffers (a whole
//! number of key rows: 16-byte aligned for 16-bit head dims that are multiples of 8)
//! into one more entry of the slices' outputs, whose entries start 32-byte aligned;
//! then the split-key kernels' merge ([`super::decode::merge`]) combines every entry
//! into the outputs. The slices' O is kept in the input type (the tensor-core
//! forward writes it so), one rounding more than the split-key kernels' f32 slices.
//!
//! Only calls where every query row sees every key qualify (no mask, or a causal mask
//! whose first row already sees the last key: a decoding step at the end of its
//! cache), with one sequence (B = 1) and no packed sequences; the others keep the
//! split-key kernels.

use cubecl::prelude::*;

use super::decode::merge;
use super::options::Geometry;
use super::{AttnError, DeviceTensor, FlashKernel, FlashOptions};

/// Fewest keys a slice gets (one tile of the tensor-core forward is 64 keys).
const MIN_SLICE_KEYS: usize = 256;

/// Query rows a kv head from which a decoding step whose query heads cannot be folded
/// into its kv heads' rows ([`grouped`]) runs here by default. Measured with
/// `flash_bench --decode` on an H100 (2026-12-06, `benchmarks/flash_attention.md`),
/// before the folding: at 30 rows (12:2 heads, a GRPO group of five) this path took
/// 0.66 ms against the split-key kernel's 0.84 ms at 200k keys, at 21 rows 1.98 vs
/// 1.13 ms, at 6-7 rows 0.64 vs 0.33 ms: unfolded, it reads the keys once a query head.
pub const DECODE_TC_MIN_ROWS: usize = 30;

/// Whether the options ask for this path for this call: forced by
/// `DecodeTuning::tensor_cores`; else when its query heads fold into the kv heads' rows
/// (every key then read once a kv head: 0.19 against the split-key kernel's 0.33 ms for
/// one 1.5B decoding step at 200k keys, 0.19 against 0.83 ms for a group of five, H100,
/// 2026-12-06), or at [`DECODE_TC_MIN_ROWS`] rows a kv head.
pub(super) fn wanted(
    g: &Geometry,
    options: &FlashOptions,
    (q, o, lse): (&DeviceTensor, &DeviceTensor, &DeviceTensor),
) -> bool {
    options.decode.tensor_cores.unwrap_or_else(|| {
        let folds = |t: &DeviceTensor| folded_layout(g, &t.shape, &t.strides).is_some();
        g.hq / g.hkv * g.sq >= DECODE_TC_MIN_ROWS || (folds(q) && folds(o) && folds(lse))
    })
}

/// Whether every query row of the call sees every key, for one sequence.
pub(super) fn applies(g: &Geometry, options: &FlashOptions) -> bool {
    let all_visible = !options.causal || options.q_offset + 1 >= options.k_offset + g.sk;
    g.b == 1 && options.cu_seqlens.is_none() && all_visible
}

/// Slices for `g`: `wanted` (at most one a key; the caller's, else
/// `DecodeTuning::splits`), else about two cubes per multiprocessor over the `Hq`
/// query heads (`Hkv` once [`grouped`]) with at least [`MIN_SLICE_KEYS`] keys each.
fn slices(client: &Client, g: &Geometry, wanted: Option<usize>) -> usize {
    // The launch's grid y is `slices x Hq`.
    let most = (65_535 / g.hq).clamp(1, g.sk);
    if let Some(n) = wanted {
        return n.clamp(1, most);
    }
    let sms = client
        .properties()
        .hardware
        .num_streaming_multiprocessors
        .unwrap_or(64) as usize;
    (2 * sms)
        .div_ceil(g.hq)
        .clamp(1, (g.sk / MIN_SLICE_KEYS).clamp(1, most))
}

/// `parts` entries of `shape` (`[heads, rows, ...]`) in one buffer of `bytes`-byte
/// elements, each entry starting 32 bytes after a multiple of 32 (wgpu binds
/// storage at such offsets).
fn entries(client: &Client, parts: usize, shape: &[usize], bytes: usize) -> DeviceTensor {
    let per_entry: usize = shape.iter().product();
    let stride = per_entry.next_multiple_of(32 / bytes.min(32));
    let mut strides = vec![stride];
    let mut inner = per_entry;
    for &n in shape {
        inner /= n.max(1);
        strides.push(inner);
    }
    let mut full = vec![parts];
    full.extend_from_slice(shape);
    DeviceTensor {
        handle: client.empty((parts * stride * bytes).max(1)),
        shape: full,
        strides,
    }
}

/// Entries `[first, first + count)` of `parts` (elements of `bytes` bytes).
fn entry_range(parts: &DeviceTensor, first: usize, count: usize, bytes: usize) -> DeviceTensor {
    let mut shape = parts.shape.clone();
    shape[0] = count;
    DeviceTensor {
        handle: parts
            .handle
            .clone()
            .offset_start((first * parts.strides[0] * bytes) as u64),
        shape,
        strides: parts.strides.clone(),
    }
}

/// `t` (`[1, heads, len, d]`) as `slices` batch entries of `len / slices` keys.
fn folded(t: &DeviceTensor, slices: usize) -> DeviceTensor {
    let chunk = t.shape[2] / slices;
    DeviceTensor {
        handle: t.handle.clone(),
        shape: vec![slices, t.shape[1], chunk, t.shape[3]],
        strides: vec![
            chunk * t.strides[2],
            t.strides[1],
            t.strides[2],
            t.strides[3],
        ],
    }
}

/// Keys `[from, len)` of `t` (`[1, heads, len, d]`, elements of `bytes` bytes).
fn tail(t: &DeviceTensor, from: usize, bytes: usize) -> DeviceTensor {
    DeviceTensor {
        handle: t
            .handle
            .clone()
            .offset_start((from * t.strides[2] * bytes) as u64),
        shape: vec![1, t.shape[1], t.shape[2] - from, t.shape[3]],
        strides: t.strides.clone(),
    }
}

/// The decoding step's O and LSE into `o` / `lse`, the slices computed by `inner`
/// (`TensorCore` on CUDA; `Scalar` lets the slicing and merging be tested where
/// there are no tensor cores) over `wanted` slices (`None`: [`slices`]'s choice).
/// With `keys` (a u32 tensor of one element on the device), only the first `keys[0]`
/// rows of k and v are keys: the slices are cut over all `Sk` rows of the buffers and
/// each reads only its rows before the count (a decoding step captured as a device
/// graph, `crate::decode_graph`). An error for a call that does not qualify
/// ([`applies`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward<F: Float + CubeElement>(
    client: &Client,
    g: &Geometry,
    (q, k, v): (&DeviceTensor, &DeviceTensor, &DeviceTensor),
    (o, lse): (&DeviceTensor, &DeviceTensor),
    options: &FlashOptions,
    inner: FlashKernel,
    wanted: Option<usize>,
    keys: Option<&DeviceTensor>,
) -> Result<(), AttnError> {
    if !applies(g, options) {
        return Err(AttnError::Options(format!(
            "decoding on the tensor cores takes one sequence whose query rows all see \
             every key (batch {}, causal {}, q_offset {}, k_offset {}, {} keys)",
            g.b, options.causal, options.q_offset, options.k_offset, g.sk
        )));
    }
    match grouped(g, q, o, lse) {
        Some((g, q, o, lse)) => {
            let (q_k_v, out) = ((&q, k, v), (&o, &lse));
            sliced::<F>(client, &g, q_k_v, out, options, (inner, wanted, keys))
        }
        None => sliced::<F>(
            client,
            g,
            (q, k, v),
            (o, lse),
            options,
            (inner, wanted, keys),
        ),
    }
}

/// The call with the query heads of each kv head folded into that head's rows: `q`
/// `[1, Hq, Sq, D]` read as `[1, Hkv, Hq / Hkv * Sq, D]` (row `g Sq + i` is position
/// `i` of the group's query head `g`), `o` and `lse` alike, so that every key is read
/// once a kv head rather than once a query head, and a slice's rows share one tile of
/// the tensor-core forward. Every row sees every key here, so the rows' order does not
/// matter to the mask. A view, no copy: `None` where a tensor's strides do not allow it
/// (positions not laid out one row stride apart within a head, with more than one
/// position), or where each kv head has one query head.
fn grouped(
    g: &Geometry,
    q: &DeviceTensor,
    o: &DeviceTensor,
    lse: &DeviceTensor,
) -> Option<(Geometry, DeviceTensor, DeviceTensor, DeviceTensor)> {
    let fold = |t: &DeviceTensor| -> Option<DeviceTensor> {
        let (shape, strides) = folded_layout(g, &t.shape, &t.strides)?;
        Some(DeviceTensor {
            handle: t.handle.clone(),
            shape,
            strides,
        })
    };
    let folded = Geometry {
        hq: g.hkv,
        sq: g.hq / g.hkv * g.sq,
        ..*g
    };
    Some((folded, fold(q)?, fold(o)?, fold(lse)?))
}

/// The shape and strides of a `[B, Hq, Sq, ...]` tensor read as `[B, Hkv, Hq / Hkv *
/// Sq, ...]` ([`grouped`]), or `None`.
fn folded_layout(g: &Geometry, shape: &[usize], s: &[usize]) -> Option<(Vec<usize>, Vec<usize>)> {
    let group = g.hq / g.hkv;
    if group == 1 || s.len() < 3 || shape.len() != s.len() {
        return None;
    }
    let row = if g.sq == 1 {
        s[1]
    } else if s[1] == g.sq * s[2] {
        s[2]
    } else {
        return None;
    };
    let mut folded_shape = vec![g.b, g.hkv, group * g.sq];
    let mut strides = vec![s[0], group * s[1], row];
    folded_shape.extend_from_slice(&shape[3..]);
    strides.extend_from_slice(&s[3..]);
    Some((folded_shape, strides))
}

/// The keys sliced into the batch of `inner`'s forward, the slices merged into `o` /
/// `lse` (the body of [`forward`], on the call as given or folded by [`grouped`]).
fn sliced<F: Float + CubeElement>(
    client: &Client,
    g: &Geometry,
    (q, k, v): (&DeviceTensor, &DeviceTensor, &DeviceTensor),
    (o, lse): (&DeviceTensor, &DeviceTensor),
    options: &FlashOptions,
    (inner, wanted, keys): (FlashKernel, Option<usize>, Option<&DeviceTensor>),
) -> Result<(), AttnError> {
    let slices = slices(client, g, wanted.or(options.decode.splits));
    let whole = g.sk / slices * slices;
    // Every key is visible to every row: the slices run without a mask.
    let full = FlashOptions {
        causal: false,
        q_offset: 0,
        k_offset: 0,
        ..options.clone()
    };
    let repeated = DeviceTensor {
        handle: q.handle.clone(),
        shape: vec![slices, g.hq, g.sq, g.d],
        strides: vec![0, q.strides[1], q.strides[2], q.strides[3]],
    };
    let whole_keys = |t: &DeviceTensor| {
        let keys = DeviceTensor {
            shape: vec![1, t.shape[1], whole, t.shape[3]],
            ..t.clone()
        };
        folded(&keys, slices)
    };
    let parts = slices + usize::from(whole < g.sk);
    let (bytes, lse_bytes) = (std::mem::size_of::<F>(), std::mem::size_of::<f32>());
    let o_part = entries(client, parts, &[g.hq, g.sq, g.d], bytes);
    let lse_part = entries(client, parts, &[g.hq, g.sq], lse_bytes);
    // Counted: slice `s` is batch entry `s` from key 0 (`k_offset`), the tail one
    // entry from key `whole`.
    type Inputs<'a> = (&'a DeviceTensor, &'a DeviceTensor, &'a DeviceTensor);
    type Outputs<'a> = (&'a DeviceTensor, &'a DeviceTensor);
    let run = |q_k_v: Inputs, (o, lse): Outputs, first_key: usize| match keys {
        None => {
            let (q, k, v) = q_k_v;
            super::flash_forward_with::<F>(client, q, k, v, o, lse, &full, inner)
        }
        Some(keys) => {
            let from = FlashOptions {
                k_offset: first_key,
                ..full.clone()
            };
            super::forward_counted::<F>(client, q_k_v, (o, lse), keys, &from, inner)
        }
    };
    let (k_whole, v_whole) = (whole_keys(k), whole_keys(v));
    run(
        (&repeated, &k_whole, &v_whole),
        (
            &entry_range(&o_part, 0, slices, bytes),
            &entry_range(&lse_part, 0, slices, lse_bytes),
        ),
        0,
    )?;
    if whole < g.sk {
        let (k, v) = (tail(k, whole, bytes), tail(v, whole, bytes));
        run(
            (q, &k, &v),
            (
                &entry_range(&o_part, slices, 1, bytes),
                &entry_range(&lse_part, slices, 1, lse_bytes),
            ),
            whole,
        )?;
    }
    merge::<F, F>(client, (&o_part, &lse_part), (o, lse), parts, g);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One decoding step of `sq` rows a query head against 4096 cached keys.
    fn step(hq: usize, hkv: usize, sq: usize) -> Geometry {
        Geometry {
            b: 1,
            hq,
            hkv,
            sq,
            sk: 4096,
            d: 128,
        }
    }

    #[test]
    fn query_heads_fold_into_the_kv_heads_rows_where_the_strides_allow() {
        // Contiguous q of `sq` rows a head folds by a view at any row count.
        let dense =
            |hq: usize, sq: usize| (vec![1, hq, sq, 128], vec![hq * sq * 128, sq * 128, 128, 1]);
        let (shape, strides) = dense(12, 5);
        let (folded_shape, folded) = folded_layout(&step(12, 2, 5), &shape, &strides).unwrap();
        assert_eq!(folded_shape, [1, 2, 30, 128]);
        // Row 7 = query head 1 (of the kv head's 6), position 2: element 1 * 640 + 2 * 128.
        assert_eq!(folded, [12 * 5 * 128, 6 * 5 * 128, 128, 1]);
        assert_eq!(7 * folded[2], 5 * 128 + 2 * 128);
        // One position: the row stride is the head stride, whatever the position stride.
        let positions_major =
            |hq: usize, sq: usize| (vec![1, hq, sq, 128], vec![sq * hq * 128, 128, hq * 128, 1]);
        let (shape, strides) = positions_major(12, 1);
        let (_, folded) = folded_layout(&step(12, 2, 1), &shape, &strides).unwrap();
        assert_eq!(folded, [12 * 128, 6 * 128, 128, 1]);
        // Positions-major with 3 positions does not fold; one query head a kv head has
        // nothing to fold; LSE ([B, Hq, Sq]) folds like q.
        let (shape, strides) = positions_major(28, 3);
        assert!(folded_layout(&step(28, 4, 3), &shape, &strides).is_none());
        let (shape, strides) = dense(4, 1);
        assert!(folded_layout(&step(4, 4, 1), &shape, &strides).is_none());
        let lse = folded_layout(&step(12, 2, 5), &[1, 12, 5], &[60, 5, 1]).unwrap();
        assert_eq!(lse, (vec![1, 2, 30], vec![60, 30, 1]));
    }
}
