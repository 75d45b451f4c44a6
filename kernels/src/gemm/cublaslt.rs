//! Row-major GEMMs through cuBLASLt on raw device addresses.
//!
//! cuBLAS is column-major; a row-major `C[m, n] = op(A) op(B)` is the column-major
//! `C^T[n, m] = op(B)^T op(A)^T`, so the call swaps the operands and keeps each
//! operand's transpose flag (a row-major matrix of `c` columns is, read column-major,
//! its transpose with leading dimension `c`).
//!
//! Per thread (CubeCL runs one stream per thread) and device: one cuBLASLt handle,
//! one 32 MiB workspace per stream (what Hopper kernels want), and per GEMM shape the
//! descriptors and the algorithm cuBLASLt's heuristic picked (chosen once, reused).
//! bf16/f16 operands, f32 accumulation and scaling.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaContext, sys as driver};

/// The workspace each stream gets.
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// Element type of A, B, C (and the bias).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GemmDtype {
    Bf16,
    F16,
}

impl GemmDtype {
    fn cuda(self) -> sys::cudaDataType {
        match self {
            GemmDtype::Bf16 => sys::cudaDataType::CUDA_R_16BF,
            GemmDtype::F16 => sys::cudaDataType::CUDA_R_16F,
        }
    }
}

/// `C[m, n] = op(A) op(B) (+ bias[n] broadcast over rows)`, all row-major and dense:
/// A is stored `[m, k]` (or `[k, m]` when `a_transposed`), B `[k, n]` (or `[n, k]`).
#[derive(Debug, Clone, Copy)]
pub struct RowMajorGemm {
    pub dtype: GemmDtype,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub a_transposed: bool,
    pub b: u64,
    pub b_transposed: bool,
    pub c: u64,
    /// `n` values added to every row of C (cuBLASLt's bias epilogue).
    pub bias: Option<u64>,
}

/// What a cached plan depends on: the shape, the flags and the operands' alignment
/// (the heuristic only offers kernels that the actual addresses allow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    device: usize,
    dtype: GemmDtype,
    m: usize,
    n: usize,
    k: usize,
    a_transposed: bool,
    b_transposed: bool,
    bias: bool,
    align: [u32; 3],
}

struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    /// cuBLAS's A (our B), cuBLAS's B (our A), C = D.
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    /// The algorithm in use: the heuristic's first until the first call has timed
    /// every candidate.
    algo: sys::cublasLtMatmulAlgo_t,
    /// The heuristic's candidates, not timed yet (emptied by the first call).
    candidates: Vec<sys::cublasLtMatmulAlgo_t>,
}

/// How many of the heuristic's algorithms the first call of a shape times.
const CANDIDATES: usize = 32;

/// Products below this many FLOPs are not timed (about 12 us at 800 TFLOP/s).
const TUNE_MIN_FLOPS: f64 = 1e10;

/// Plans kept per thread before the cache starts over.
const MAX_PLANS: usize = 1024;

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: the descriptors were created by make_plan and are destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for layout in self.layouts {
                let _ = lt::destroy_matrix_layout(layout);
            }
        }
    }
}

struct DeviceState {
    context: Arc<CudaContext>,
    handle: sys::cublasLtHandle_t,
    /// Workspace address per stream.
    workspaces: HashMap<usize, u64>,
}

#[derive(Default)]
struct ThreadState {
    devices: HashMap<usize, DeviceState>,
    plans: HashMap<PlanKey, Plan>,
}

thread_local! {
    static STATE: RefCell<ThreadState> = RefCell::new(ThreadState::default());
}

/// A cuBLASLt or CUDA failure, with the call that failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cuBLASLt {call}: {reason}")]
pub struct GemmError {
    pub call: String,
    pub reason: String,
}

fn fail(call: &str, reason: impl std::fmt::Display) -> GemmError {
    GemmError {
        call: call.into(),
        reason: reason.to_string(),
    }
}

/// Largest power of two (up to 256) dividing `address`: the alignment cuBLASLt may
/// assume for the operand.
fn alignment(address: u64) -> u32 {
    if address == 0 {
        256
    } else {
        (1u64 << address.trailing_zeros().min(8)) as u32
    }
}

/// Loads cuBLASLt and creates this thread's handle for `device` (a probe: the error
/// says why GEMMs cannot run here).
pub fn probe(device: usize) -> Result<(), GemmError> {
    STATE.with(|state| device_state(&mut state.borrow_mut(), device).map(|_| ()))
}

fn device_state(state: &mut ThreadState, device: usize) -> Result<&mut DeviceState, GemmError> {
    use std::collections::hash_map::Entry;
    let entry = match state.devices.entry(device) {
        Entry::Occupied(entry) => entry.into_mut(),
        Entry::Vacant(slot) => {
            let context = CudaContext::new(device).map_err(|e| fail("context", e))?;
            context.bind_to_thread().map_err(|e| fail("context", e))?;
            let handle = std::panic::catch_unwind(lt::create_handle)
                .map_err(|_| {
                    fail(
                        "cublasLtCreate",
                        "libcublasLt could not be loaded (is /usr/local/cuda/lib64 on LD_LIBRARY_PATH?)",
                    )
                })?
                .map_err(|e| fail("cublasLtCreate", e))?;
            slot.insert(DeviceState {
                context,
                handle,
                workspaces: HashMap::new(),
            })
        }
    };
    entry
        .context
        .bind_to_thread()
        .map_err(|e| fail("context", e))?;
    Ok(entry)
}

fn workspace(entry: &mut DeviceState, stream: driver::CUstream) -> Result<u64, GemmError> {
    if let Some(&ptr) = entry.workspaces.get(&(stream as usize)) {
        return Ok(ptr);
    }
    // SAFETY: the device's context is current (device_state binds it); the workspace
    // lives as long as the process (one per stream).
    let ptr = unsafe { cudarc::driver::result::malloc_sync(WORKSPACE_BYTES) }
        .map_err(|e| fail("workspace allocation", e))?;
    entry.workspaces.insert(stream as usize, ptr);
    Ok(ptr)
}

/// Queues `gemm` on `stream` (no host synchronisation). The addresses must stay
/// valid until the stream reaches the GEMM.
///
/// # Safety
/// The addresses name device buffers of `device` large enough for the shapes, and
/// `stream` is a live stream of that device.
pub unsafe fn run(
    device: usize,
    stream: driver::CUstream,
    gemm: &RowMajorGemm,
) -> Result<(), GemmError> {
    if gemm.m == 0 || gemm.n == 0 {
        return Ok(());
    }
    STATE.with(|state| {
        let mut state = state.borrow_mut();
        let state = &mut *state;
        let entry = device_state(state, device)?;
        let handle = entry.handle;
        let work = workspace(entry, stream)?;
        let key = PlanKey {
            device,
            dtype: gemm.dtype,
            m: gemm.m,
            n: gemm.n,
            k: gemm.k,
            a_transposed: gemm.a_transposed,
            b_transposed: gemm.b_transposed,
            bias: gemm.bias.is_some(),
            align: [alignment(gemm.a), alignment(gemm.b), alignment(gemm.c)],
        };
        if !state.plans.contains_key(&key) {
            if state.plans.len() >= MAX_PLANS {
                // Shapes that keep changing (inference over prompts of every length):
                // start over rather than grow without bound.
                state.plans.clear();
            }
            let plan = unsafe { make_plan(handle, &key)? };
            state.plans.insert(key, plan);
        }
        let plan = state.plans.get_mut(&key).expect("inserted above");
        if let Some(bias) = gemm.bias {
            unsafe {
                set_desc(
                    plan.desc,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    &bias,
                )?
            };
        }
        let call = |algo: &sys::cublasLtMatmulAlgo_t| {
            let (one, zero) = (1.0f32, 0.0f32);
            // cuBLAS's A is our B and its B our A (see the module note).
            unsafe {
                lt::matmul(
                    handle,
                    plan.desc,
                    &one as *const f32 as *const c_void,
                    &zero as *const f32 as *const c_void,
                    gemm.b as *const c_void,
                    plan.layouts[0],
                    gemm.a as *const c_void,
                    plan.layouts[1],
                    gemm.c as *const c_void,
                    plan.layouts[2],
                    gemm.c as *mut c_void,
                    plan.layouts[2],
                    algo,
                    work as *mut c_void,
                    WORKSPACE_BYTES,
                    stream as sys::cudaStream_t,
                )
            }
            .map_err(|e| fail("cublasLtMatmul", format!("{e} for {key:?}")))
        };
        let candidates = std::mem::take(&mut plan.candidates);
        let flops = 2.0 * gemm.m as f64 * gemm.n as f64 * gemm.k as f64;
        if candidates.len() > 1
            && flops >= TUNE_MIN_FLOPS
            && crate::env_switch::switch("LONGVIEW_GEMM_TUNE", true)
        {
            // The first call of a large shape times the candidates on its own operands
            // (the output is written again by the real call below) and keeps the
            // fastest; this waits for the stream once per shape. Small products (decode
            // steps) keep the heuristic's first: timing would cost more than it saves.
            let timed = unsafe { fastest(stream, &candidates, |algo| call(algo)) }?;
            plan.algo = timed;
        }
        let algo = plan.algo;
        call(&algo)
    })
}

/// The fastest of `candidates` (mean of 3 calls after one untimed, CUDA events on
/// `stream`); a candidate that fails to run is skipped.
unsafe fn fastest(
    stream: driver::CUstream,
    candidates: &[sys::cublasLtMatmulAlgo_t],
    call: impl Fn(&sys::cublasLtMatmulAlgo_t) -> Result<(), GemmError>,
) -> Result<sys::cublasLtMatmulAlgo_t, GemmError> {
    use cudarc::driver::result::event;
    let flags = driver::CUevent_flags::CU_EVENT_DEFAULT;
    let start = event::create(flags).map_err(|e| fail("event", e))?;
    let end = event::create(flags).map_err(|e| fail("event", e))?;
    let mut best: Option<(f32, sys::cublasLtMatmulAlgo_t)> = None;
    for algo in candidates {
        if call(algo).is_err() {
            continue;
        }
        let timed = unsafe {
            event::record(start, stream)
                .and_then(|_| {
                    for _ in 0..3 {
                        let _ = call(algo);
                    }
                    event::record(end, stream)
                })
                .and_then(|_| event::synchronize(end))
                .and_then(|_| event::elapsed(start, end))
        };
        if let Ok(ms) = timed
            && best.is_none_or(|(b, _)| ms < b)
        {
            best = Some((ms, *algo));
        }
    }
    unsafe {
        let _ = event::destroy(start);
        let _ = event::destroy(end);
    }
    best.map(|(_, algo)| algo)
        .ok_or_else(|| fail("cublasLtMatmul", "no candidate algorithm ran"))
}

unsafe fn set_desc<T>(
    desc: sys::cublasLtMatmulDesc_t,
    attr: sys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<(), GemmError> {
    unsafe {
        lt::set_matmul_desc_attribute(
            desc,
            attr,
            value as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
    }
    .map_err(|e| fail(&format!("set {attr:?}"), e))
}

/// Descriptors for `key` and the algorithm the heuristic ranks first.
unsafe fn make_plan(handle: sys::cublasLtHandle_t, key: &PlanKey) -> Result<Plan, GemmError> {
    use sys::cublasLtMatmulDescAttributes_t as Attr;
    // cublasOperation_t: CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 (an i32 attribute).
    const CUBLAS_OP_N: i32 = 0;
    const CUBLAS_OP_T: i32 = 1;
    let desc = lt::create_matmul_desc(
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        sys::cudaDataType::CUDA_R_32F,
    )
    .map_err(|e| fail("cublasLtMatmulDescCreate", e))?;
    let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
    // Column-major problem: m' = n, n' = m, A' = our B, B' = our A.
    let (m, n, k) = (key.n as u64, key.m as u64, key.k as u64);
    unsafe {
        set_desc(
            desc,
            Attr::CUBLASLT_MATMUL_DESC_TRANSA,
            &op(key.b_transposed),
        )?;
        set_desc(
            desc,
            Attr::CUBLASLT_MATMUL_DESC_TRANSB,
            &op(key.a_transposed),
        )?;
        if key.bias {
            set_desc(
                desc,
                Attr::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            )?;
            set_desc(
                desc,
                Attr::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                &key.dtype.cuda(),
            )?;
        }
    }
    let ty = key.dtype.cuda();
    let layout = |rows: u64, cols: u64| {
        lt::create_matrix_layout(ty, rows, cols, rows as i64)
            .map_err(|e| fail("cublasLtMatrixLayoutCreate", e))
    };
    // A' is m x k before its op (k x m stored when transposed); B' is k x n.
    let a_layout = if key.b_transposed {
        layout(k, m)?
    } else {
        layout(m, k)?
    };
    let b_layout = if key.a_transposed {
        layout(n, k)?
    } else {
        layout(k, n)?
    };
    let c_layout = layout(m, n)?;
    let pref = lt::create_matmul_pref().map_err(|e| fail("cublasLtMatmulPreferenceCreate", e))?;
    let candidates = unsafe {
        use sys::cublasLtMatmulPreferenceAttributes_t as Pref;
        // MAX_WORKSPACE_BYTES is a uint64_t, the MIN_ALIGNMENT_* attributes uint32_t.
        fn set<T>(
            pref: sys::cublasLtMatmulPreference_t,
            attr: Pref,
            value: T,
        ) -> Result<(), GemmError> {
            unsafe {
                lt::set_matmul_pref_attribute(
                    pref,
                    attr,
                    &value as *const T as *const c_void,
                    std::mem::size_of::<T>(),
                )
            }
            .map_err(|e| fail(&format!("set {attr:?}"), e))
        }
        let prefs = set(
            pref,
            Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            WORKSPACE_BYTES as u64,
        )
        .and_then(|_| {
            set(
                pref,
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                key.align[1],
            )
        })
        .and_then(|_| {
            set(
                pref,
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                key.align[0],
            )
        })
        .and_then(|_| {
            set(
                pref,
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                key.align[2],
            )
        })
        .and_then(|_| {
            set(
                pref,
                Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                key.align[2],
            )
        });
        let found = prefs.and_then(|_| {
            let mut results: [std::mem::MaybeUninit<sys::cublasLtMatmulHeuristicResult_t>;
                CANDIDATES] = [const { std::mem::MaybeUninit::uninit() }; CANDIDATES];
            let mut count = 0i32;
            sys::cublasLtMatmulAlgoGetHeuristic(
                handle,
                desc,
                a_layout,
                b_layout,
                c_layout,
                c_layout,
                pref,
                CANDIDATES as i32,
                results.as_mut_ptr() as *mut sys::cublasLtMatmulHeuristicResult_t,
                &mut count,
            )
            .result()
            .map_err(|e| fail("cublasLtMatmulAlgoGetHeuristic", format!("{e} for {key:?}")))?;
            let algos: Vec<_> = results[..count.max(0) as usize]
                .iter()
                .map(|r| r.assume_init())
                .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .map(|r| r.algo)
                .collect();
            if algos.is_empty() {
                return Err(fail(
                    "cublasLtMatmulAlgoGetHeuristic",
                    format!("no algorithm for {key:?}"),
                ));
            }
            Ok(algos)
        });
        let _ = lt::destroy_matmul_pref(pref);
        found?
    };
    Ok(Plan {
        desc,
        layouts: [a_layout, b_layout, c_layout],
        algo: candidates[0],
        candidates,
    })
}

#[cfg(test)]
mod tests {
    use super::alignment;

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x1000), 256);
        assert_eq!(alignment(0x1002), 2);
        assert_eq!(alignment(0x1080), 128);
        assert_eq!(alignment(0), 256);
    }
}
