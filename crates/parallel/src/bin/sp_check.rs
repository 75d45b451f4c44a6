//! Sequence-parallel attention over NCCL on real GPUs: every collective against
//! host-computed values, then ring (plain, zigzag), Ulysses and 2D attention, forward
//! and backward, against single-GPU attention on the same inputs (each rank compares
//! its shard; f32 and bf16).
//!
//! `sp_check --nproc 4` starts 4 ranks on this machine (one per GPU) like
//! `cargo xtask launch`; under torchrun/SLURM run it once per rank without `--nproc`.
//! The single-GPU reference is this crate's block attention over the whole sequence in
//! f32 (checked against autodiff attention on the CPU in `tests/equivalence.rs`); the
//! bf16 shards run their blocks on the flash kernels (feature `flash`).
//!
//! `sp_check --nproc 4 --tokens 131072 --heads 16 --kv-heads 16 --dim 128 --bench 2`
//! times causal bf16 fwd+bwd per scheme instead (no checks) against one GPU's time on
//! the whole sequence divided by P.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::{DType, Device, Tensor, TensorData};
use longview_comm::nccl::NcclComm;
use longview_comm::{Communicator, ReduceOp};
use longview_launch::{LaunchOptions, launch_local};
use longview_parallel::autodiff::{WithComm, distributed_attention};
use longview_parallel::block::{self, Block};
use longview_parallel::layout::{SeqLayout, shard};
use longview_parallel::ring::{RingAttention, RingBalance};
use longview_parallel::two_d::{TwoDAttention, TwoDGroups};
use longview_parallel::ulysses::UlyssesAttention;

struct Args {
    nproc: Option<usize>,
    tokens: usize,
    heads: usize,
    kv_heads: usize,
    dim: usize,
    /// `--bench REPS`: time bf16 fwd+bwd per scheme instead of checking.
    bench: Option<usize>,
    /// `--fault stall|mismatch`: make the last rank misbehave and show how every
    /// rank fails (run with a short `LONGVIEW_NCCL_TIMEOUT_S`; `mismatch` with
    /// `LONGVIEW_NCCL_CHECK=1`).
    fault: Option<String>,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        nproc: None,
        tokens: 2048,
        heads: 8,
        kv_heads: 2,
        dim: 64,
        bench: None,
        fault: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> Result<usize, String> {
            it.next()
                .ok_or(format!("{name} needs a value"))?
                .parse()
                .map_err(|_| format!("{name} needs a number"))
        };
        match flag.as_str() {
            "--nproc" => args.nproc = Some(value("--nproc")?),
            "--tokens" => args.tokens = value("--tokens")?,
            "--heads" => args.heads = value("--heads")?,
            "--kv-heads" => args.kv_heads = value("--kv-heads")?,
            "--dim" => args.dim = value("--dim")?,
            "--bench" => args.bench = Some(value("--bench")?),
            "--fault" => {
                let kind = it.next().ok_or("--fault needs stall or mismatch")?;
                if kind != "stall" && kind != "mismatch" {
                    return Err(format!("--fault {kind}: expected stall or mismatch"));
                }
                args.fault = Some(kind);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// Deterministic values in [-1, 1) (xorshift), the same on every rank.
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn tensor(seed: u64, shape: [usize; 4], device: &Device) -> Tensor<4> {
    let n = shape.iter().product();
    Tensor::from_data(
        TensorData::new(values(seed, n), shape),
        (device, DType::F32),
    )
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.cast(DType::F32).into_data().iter::<f32>().collect()
}

fn relative_error<const D: usize>(got: Tensor<D>, want: Tensor<D>) -> f32 {
    let (got, want) = (host(got), host(want));
    let scale = want.iter().fold(1f32, |m, x| m.max(x.abs()));
    got.iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs() / scale)
        .fold(0f32, f32::max)
}

struct Report {
    failures: usize,
}

impl Report {
    fn check(&mut self, comm: &NcclComm, what: &str, error: f32, tolerance: f32) {
        // The worst error over the ranks, printed once by rank 0.
        let worst = comm
            .all_reduce(
                Tensor::<1>::from_data(TensorData::new(vec![error], [1]), comm.device()),
                ReduceOp::Max,
            )
            .map(|t| host(t)[0])
            .unwrap_or(f32::INFINITY);
        let ok = worst <= tolerance;
        if !ok {
            self.failures += 1;
        }
        if comm.rank() == 0 {
            println!(
                "{} {what}: worst relative error over ranks {worst:.2e} (tolerance {tolerance:.0e})",
                if ok { "PASS" } else { "FAIL" }
            );
        }
    }
}

fn collectives(comm: &NcclComm, report: &mut Report) -> Result<(), String> {
    let (r, p) = (comm.rank(), comm.world_size());
    let device = comm.device().clone();
    let mine = |r: usize| {
        Tensor::<2>::from_data(
            TensorData::new(
                (0..6).map(|i| (100 * r + i) as f32).collect::<Vec<_>>(),
                [2, 3],
            ),
            &device,
        )
    };
    let e = |x| format!("{x}");
    let sum = comm.all_reduce(mine(r), ReduceOp::Sum).map_err(e)?;
    let want: Tensor<2> = (0..p).map(mine).reduce(|a, b| a + b).unwrap();
    report.check(
        comm,
        "all_reduce sum",
        relative_error(sum, want.clone()),
        0.0,
    );
    let gathered = comm.all_gather(mine(r), 1).map_err(e)?;
    let want_gather = Tensor::cat((0..p).map(mine).collect(), 1);
    report.check(
        comm,
        "all_gather (dim 1)",
        relative_error(gathered, want_gather),
        0.0,
    );
    let wide = Tensor::cat((0..p).map(|_| mine(r)).collect(), 1);
    let scattered = comm.reduce_scatter(wide, 1, ReduceOp::Sum).map_err(e)?;
    report.check(
        comm,
        "reduce_scatter (dim 1)",
        relative_error(scattered, want),
        0.0,
    );
    let b = comm.broadcast(mine(r), p - 1).map_err(e)?;
    report.check(comm, "broadcast", relative_error(b, mine(p - 1)), 0.0);
    let parts = (0..p).map(|j| mine(r) * (j as f32 + 1.0)).collect();
    let routed = comm.all_to_all(parts).map_err(e)?;
    let worst = routed
        .into_iter()
        .enumerate()
        .map(|(i, t)| relative_error(t, mine(i) * (r as f32 + 1.0)))
        .fold(0f32, f32::max);
    report.check(comm, "all_to_all", worst, 0.0);
    let shifted = comm
        .start_shift(&mine(r).cast(DType::BF16), (r + 1) % p, (r + p - 1) % p)
        .map_err(e)?
        .wait()
        .map_err(e)?;
    let want = mine((r + p - 1) % p).cast(DType::BF16);
    report.check(
        comm,
        "ring shift (bf16)",
        relative_error(shifted, want),
        0.0,
    );
    Ok(())
}

type Shards = [Tensor<4>; 4];
type Out = (Tensor<4>, Tensor<3>, Tensor<4>, Tensor<4>, Tensor<4>);

fn attention(comm: &NcclComm, args: &Args, report: &mut Report) -> Result<(), String> {
    let (r, p) = (comm.rank(), comm.world_size());
    let device = comm.device().clone();
    let (n, h, hkv, d) = (args.tokens, args.heads, args.kv_heads, args.dim);
    let scale = (d as f64).powf(-0.5);
    let q = tensor(1, [1, h, n, d], &device);
    let k = tensor(2, [1, hkv, n, d], &device);
    let v = tensor(3, [1, hkv, n, d], &device);
    let d_o = tensor(4, [1, h, n, d], &device);
    let full = Block {
        q: q.clone(),
        k: k.clone(),
        v: v.clone(),
        causal: true,
        scale,
        segments: None,
    };
    let (o_ref, lse_ref) = block::forward(&full);
    let delta = block::delta(o_ref.clone(), d_o.clone());
    let (dq_ref, dk_ref, dv_ref) = block::backward(&full, lse_ref.clone(), delta, d_o.clone());
    let e = |x| format!("{x}");
    for dtype in [DType::F32, DType::BF16] {
        let tolerance = if dtype == DType::F32 { 1e-4 } else { 3e-2 };
        let mut run = |name: &str,
                       layout: SeqLayout,
                       scheme: &dyn Fn(Shards) -> Result<Out, String>|
         -> Result<(), String> {
            let cut = |t: &Tensor<4>| shard(t.clone(), 2, layout, r, p).map_err(e);
            let inputs = [cut(&q)?, cut(&k)?, cut(&v)?, cut(&d_o)?].map(|t| t.cast(dtype));
            let start = Instant::now();
            let (o, lse, dq, dk, dv) = scheme(inputs)?;
            let seconds = start.elapsed().as_secs_f64();
            let errors = [
                relative_error(o, cut(&o_ref)?),
                relative_error(lse, shard(lse_ref.clone(), 2, layout, r, p).map_err(e)?),
                relative_error(dq, cut(&dq_ref)?),
                relative_error(dk, cut(&dk_ref)?),
                relative_error(dv, cut(&dv_ref)?),
            ];
            for (what, err) in ["O", "LSE", "dQ", "dK", "dV"].iter().zip(errors) {
                report.check(
                    comm,
                    &format!("{name} {dtype:?} P={p} {what}"),
                    err,
                    tolerance,
                );
            }
            if r == 0 {
                println!(
                    "     {name} {dtype:?}: fwd+bwd {seconds:.3} s on rank 0 (first call: kernel compilation included; not a benchmark, see --bench)"
                );
            }
            Ok(())
        };
        for (balance, layout) in [
            (RingBalance::Plain, SeqLayout::Contiguous),
            (RingBalance::Zigzag, SeqLayout::Zigzag),
        ] {
            let ring = RingAttention {
                balance,
                causal: true,
                scale,
            };
            run(&format!("ring {balance:?}"), layout, &|[q, k, v, d_o]| {
                let (o, lse) = ring
                    .forward(comm, q.clone(), k.clone(), v.clone())
                    .map_err(e)?;
                let (dq, dk, dv) = ring
                    .backward(comm, (q, k, v), o.clone(), lse.clone(), d_o)
                    .map_err(e)?;
                Ok((o, lse, dq, dk, dv))
            })?;
        }
        let ulysses = UlyssesAttention {
            layout: SeqLayout::Zigzag,
            causal: true,
            scale,
        };
        run("Ulysses", SeqLayout::Zigzag, &|[q, k, v, d_o]| {
            let (o, lse) = ulysses
                .forward(comm, q.clone(), k.clone(), v.clone())
                .map_err(e)?;
            let (dq, dk, dv) = ulysses
                .backward(comm, (q, k, v), o.clone(), lse.clone(), d_o)
                .map_err(e)?;
            Ok((o, lse, dq, dk, dv))
        })?;
        if p >= 4 && p % 2 == 0 {
            let groups = TwoDGroups::new(comm, 2).map_err(e)?;
            let two_d = TwoDAttention {
                causal: true,
                scale,
            };
            run("2D U=2", groups.layout(), &|[q, k, v, d_o]| {
                let (o, lse) = two_d
                    .forward(&groups, q.clone(), k.clone(), v.clone())
                    .map_err(e)?;
                let (dq, dk, dv) = two_d
                    .backward(&groups, (q, k, v), o.clone(), lse.clone(), d_o)
                    .map_err(e)?;
                Ok((o, lse, dq, dk, dv))
            })?;
        }
    }

    // The same zigzag ring as one autodiff op on the CUDA autodiff device: Burn's
    // backward must give the reference gradients (f32).
    let op_comm = comm.split(&[(0..p).collect()]).map_err(|x| x.to_string())?;
    let scheme = Arc::new(WithComm {
        comm: op_comm,
        attention: RingAttention {
            balance: RingBalance::Zigzag,
            causal: true,
            scale,
        },
    });
    let ad = device.clone().autodiff();
    let cut = |t: &Tensor<4>| shard(t.clone(), 2, SeqLayout::Zigzag, r, p).map_err(e);
    let leaf = |t: &Tensor<4>| -> Result<Tensor<4>, String> {
        Ok(Tensor::from_data(cut(t)?.into_data(), &ad).require_grad())
    };
    let (q_l, k_l, v_l) = (leaf(&q)?, leaf(&k)?, leaf(&v)?);
    let d_o_l = Tensor::<4>::from_data(cut(&d_o)?.into_data(), &ad);
    let (o, _lse) =
        distributed_attention(scheme, q_l.clone(), k_l.clone(), v_l.clone()).map_err(e)?;
    let grads = (o * d_o_l).sum().backward();
    for (what, leaf, want) in [
        ("dQ", &q_l, &dq_ref),
        ("dK", &k_l, &dk_ref),
        ("dV", &v_l, &dv_ref),
    ] {
        let got = leaf.grad(&grads).ok_or(format!("no gradient for {what}"))?;
        let got = Tensor::<4>::from_data(got.into_data(), &device);
        report.check(
            comm,
            &format!("autodiff op, zigzag ring F32 P={p} {what}"),
            relative_error(got, cut(want)?),
            1e-4,
        );
    }
    Ok(())
}

/// Waits for every rank (a one-element all-reduce) after the device finished.
fn barrier(comm: &NcclComm) -> Result<(), String> {
    let one = Tensor::<1>::from_data(TensorData::new(vec![1f32], [1]), comm.device());
    comm.all_reduce(one, ReduceOp::Sum)
        .map(|t| host(t)[0])
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The slowest rank's seconds for `f`, averaged over `reps` after one warm-up call.
fn timed(
    comm: &NcclComm,
    reps: usize,
    mut f: impl FnMut() -> Result<(), String>,
) -> Result<f64, String> {
    f()?;
    barrier(comm)?;
    let start = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    barrier(comm)?;
    let mine = start.elapsed().as_secs_f64() / reps as f64;
    let worst = comm
        .all_reduce(
            Tensor::<1>::from_data(TensorData::new(vec![mine as f32], [1]), comm.device()),
            ReduceOp::Max,
        )
        .map_err(|e| e.to_string())?;
    Ok(host(worst)[0] as f64)
}

/// Causal bf16 attention fwd+bwd per scheme over `args.tokens` total tokens, each rank
/// holding its shard; the ideal is one GPU's time on the whole sequence (the same flash
/// kernels, measured by rank 0 while the others wait) divided by P.
fn bench(comm: &NcclComm, args: &Args, reps: usize) -> Result<(), String> {
    use burn::tensor::Distribution;
    let (r, p) = (comm.rank(), comm.world_size());
    let device = comm.device().clone();
    let (n, h, hkv, d) = (args.tokens, args.heads, args.kv_heads, args.dim);
    if n % (2 * p) != 0 {
        return Err(format!("--tokens {n} must be a multiple of 2 x {p} ranks"));
    }
    let scale = (d as f64).powf(-0.5);
    let e = |x: longview_parallel::ParallelError| x.to_string();
    let random = |heads: usize, len: usize| {
        Tensor::<4>::random(
            [1, heads, len, d],
            Distribution::Uniform(-1.0, 1.0),
            &device,
        )
        .cast(DType::BF16)
    };
    // 3.5 x the causal forward's 2 B H N^2 D (FlashAttention's convention).
    let flops = 3.5 * 2.0 * h as f64 * (n as f64).powi(2) * d as f64;
    let mut single = None;
    if r == 0 {
        let full = Block {
            q: random(h, n),
            k: random(hkv, n),
            v: random(hkv, n),
            causal: true,
            scale,
            segments: None,
        };
        let d_o = random(h, n);
        let step = || {
            let (o, lse) = block::forward(&full);
            let delta = block::delta(o, d_o.clone());
            let grads = block::backward(&full, lse, delta, d_o.clone());
            let _ = host(grads.0.slice([0..1, 0..1, 0..1, 0..1]));
        };
        step();
        let start = Instant::now();
        for _ in 0..reps {
            step();
        }
        single = Some(start.elapsed().as_secs_f64() / reps as f64);
    }
    barrier(comm)?;
    if let Some(t) = single {
        println!(
            "bench: causal bf16 fwd+bwd, {n} tokens, H{h}/{hkv} D{d}, P={p}; one GPU on all {n} tokens: {:.1} ms ({:.1} TFLOP/s); ideal on {p}: {:.1} ms",
            t * 1e3,
            flops / t / 1e12,
            t / p as f64 * 1e3
        );
        println!("| scheme | ms per fwd+bwd (slowest rank) | TFLOP/s total | % of ideal |");
        println!("|---|---|---|---|");
    }
    let ideal = single.unwrap_or(0.0) / p as f64;
    let report = |name: &str, seconds: f64| {
        if r == 0 {
            println!(
                "| {name} | {:.1} | {:.1} | {:.0}% |",
                seconds * 1e3,
                flops / seconds / 1e12,
                100.0 * ideal / seconds
            );
        }
    };
    let local = n / p;
    let (q, k, v, d_o) = (
        random(h, local),
        random(hkv, local),
        random(hkv, local),
        random(h, local),
    );
    for balance in [RingBalance::Plain, RingBalance::Zigzag] {
        let ring = RingAttention {
            balance,
            causal: true,
            scale,
        };
        let t = timed(comm, reps, || {
            let (o, lse) = ring
                .forward(comm, q.clone(), k.clone(), v.clone())
                .map_err(e)?;
            let (dq, _, _) = ring
                .backward(comm, (q.clone(), k.clone(), v.clone()), o, lse, d_o.clone())
                .map_err(e)?;
            let _ = host(dq.slice([0..1, 0..1, 0..1, 0..1]));
            Ok(())
        })?;
        report(&format!("ring {balance:?}"), t);
    }
    if h % p == 0 {
        let ulysses = UlyssesAttention {
            layout: SeqLayout::Zigzag,
            causal: true,
            scale,
        };
        let t = timed(comm, reps, || {
            let (o, lse) = ulysses
                .forward(comm, q.clone(), k.clone(), v.clone())
                .map_err(e)?;
            let (dq, _, _) = ulysses
                .backward(comm, (q.clone(), k.clone(), v.clone()), o, lse, d_o.clone())
                .map_err(e)?;
            let _ = host(dq.slice([0..1, 0..1, 0..1, 0..1]));
            Ok(())
        })?;
        report("Ulysses", t);
    }
    if p >= 4 && p % 2 == 0 {
        let groups = TwoDGroups::new(comm, 2).map_err(e)?;
        let two_d = TwoDAttention {
            causal: true,
            scale,
        };
        let t = timed(comm, reps, || {
            let (o, lse) = two_d
                .forward(&groups, q.clone(), k.clone(), v.clone())
                .map_err(e)?;
            let (dq, _, _) = two_d
                .backward(
                    &groups,
                    (q.clone(), k.clone(), v.clone()),
                    o,
                    lse,
                    d_o.clone(),
                )
                .map_err(e)?;
            let _ = host(dq.slice([0..1, 0..1, 0..1, 0..1]));
            Ok(())
        })?;
        report("2D U=2 x R", t);
    }
    Ok(())
}

/// `--fault`: every rank all-reduces; the last rank then either stops calling
/// collectives for a while (`stall`: its peers' next all-reduce must end with
/// `Stalled` after `LONGVIEW_NCCL_TIMEOUT_S`) or all-gathers while the others
/// all-reduce (`mismatch`: with `LONGVIEW_NCCL_CHECK=1` every rank must end with
/// `Mismatch`). Prints the error each rank got; no error is a failed check (except
/// on the late rank of `stall`, see below).
fn fault(comm: &NcclComm, kind: &str) -> Result<(), String> {
    let device = comm.device();
    let one = || Tensor::<1>::from_data(TensorData::new(vec![1.0f32; 1024], [1024]), device);
    comm.all_reduce(one(), ReduceOp::Sum)
        .map_err(|e| format!("the first all-reduce failed: {e}"))?;
    let last = comm.world_size() - 1;
    let start = Instant::now();
    let outcome = match (kind, comm.rank() == last) {
        ("stall", true) => {
            // Stay away longer than the peers' timeout, then try to rejoin.
            std::thread::sleep(Duration::from_secs(20));
            comm.all_reduce(one(), ReduceOp::Sum).map(|_| ())
        }
        ("mismatch", true) => comm.all_gather(one(), 0).map(|_| ()),
        _ => comm.all_reduce(one(), ReduceOp::Sum).map(|_| ()),
    };
    match outcome {
        // Measured on 4 H200s: the late rank's all-reduce can complete on what its
        // aborted peers had already pushed (NCCL cannot tell); a real job stops it
        // through the launcher when the peers exit with their `Stalled` errors.
        Ok(()) if kind == "stall" && comm.rank() == last => {
            println!(
                "[rank {}] fault stall: the late all-reduce returned after {:.1} s (its peers \
                 had aborted); the launcher stops this rank when they exit",
                comm.rank(),
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Ok(()) => Err(format!(
            "rank {}: the {kind} fault went unnoticed ({:.1} s)",
            comm.rank(),
            start.elapsed().as_secs_f64()
        )),
        Err(e) => {
            println!(
                "[rank {}] fault {kind}: failed after {:.1} s with: {e}",
                comm.rank(),
                start.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!(
                "sp_check: {e}\nusage: sp_check [--nproc N] [--tokens N] [--heads H] [--kv-heads K] [--dim D] [--bench REPS] [--fault stall|mismatch]"
            );
            return ExitCode::from(2);
        }
    };
    if let Some(nproc) = args.nproc
        && std::env::var_os("RANK").is_none()
    {
        let mut command: Vec<std::ffi::OsString> = std::env::args_os().collect();
        let at = command.iter().position(|a| a == "--nproc").expect("given");
        command.drain(at..at + 2);
        command[0] = std::env::current_exe().expect("own path").into();
        let options = LaunchOptions {
            nproc,
            master_port: 0,
            command,
        };
        return match launch_local(&options) {
            Ok(0) => ExitCode::SUCCESS,
            Ok(code) => ExitCode::from(code.clamp(1, 255) as u8),
            Err(e) => {
                eprintln!("sp_check: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let comm = match NcclComm::from_env(Duration::from_secs(120)) {
        Ok(Some(comm)) => comm,
        Ok(None) => {
            eprintln!(
                "sp_check: no RANK/WORLD_SIZE: start it with --nproc N, cargo xtask launch or torchrun"
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("sp_check: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(kind) = &args.fault {
        return match fault(&comm, kind) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sp_check: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(reps) = args.bench {
        return match bench(&comm, &args, reps.max(1)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("sp_check rank {}: {e}", comm.rank());
                ExitCode::FAILURE
            }
        };
    }
    let mut report = Report { failures: 0 };
    let result =
        collectives(&comm, &mut report).and_then(|()| attention(&comm, &args, &mut report));
    if let Err(e) = result {
        eprintln!("sp_check rank {}: {e}", comm.rank());
        return ExitCode::FAILURE;
    }
    if comm.rank() == 0 {
        println!("{} failures", report.failures);
    }
    if report.failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
