//! What every subcommand shares: the device flags (`--device`, `--dtype`, `--seed`),
//! the measured matmul ceiling MFU is stated against, and the CPU memory check that
//! refuses a run before the allocator would abort it.

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, FloatDType};
use clap::Args;

/// Where tensors live.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// `cpu` (burn-flex, always built) or `cuda` / `cuda:N` (needs the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Default float dtype of the device: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Seed of the parameter initialisation and the generated inputs (default 0; for
    /// `train`, the config's `run.seed` unless given).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl DeviceArgs {
    /// `--seed`, or 0.
    pub fn seed(&self) -> u64 {
        self.seed.unwrap_or(0)
    }

    /// The device with autodiff enabled and its default float dtype configured.
    pub fn device(&self) -> Result<Device> {
        let mut device = match self.device.as_str() {
            "cpu" => Device::flex(),
            name if name == "cuda" || name.starts_with("cuda:") => cuda_device(name)?,
            other => bail!("--device `{other}`: expected `cpu`, `cuda` or `cuda:N`"),
        };
        let dtype = match self.dtype.as_str() {
            "f32" => FloatDType::F32,
            "bf16" => FloatDType::BF16,
            "f16" => FloatDType::F16,
            other => bail!("--dtype `{other}`: expected f32, bf16 or f16"),
        };
        // A device's default dtypes lock once; asking again for what it already has (a
        // launched rank's job builds its device after the command did) is no error.
        if let Err(e) = device.configure(burn::tensor::DeviceConfig::default().float_dtype(dtype))
            && device.settings().float_dtype != dtype
        {
            return Err(e).with_context(|| {
                format!(
                    "cannot use dtype {} on {} (its default float dtype is already {:?})",
                    self.dtype,
                    self.device,
                    device.settings().float_dtype
                )
            });
        }
        device.seed(self.seed());
        Ok(device.autodiff())
    }
}

impl DeviceArgs {
    /// The device of one process of a launched job: `--device cuda` becomes GPU
    /// `LOCAL_RANK` (what the NCCL communicator binds); the CPU and a fixed GPU index
    /// are refused with the reason.
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub fn for_local_rank(&self, env: &longview_launch::ProcessEnv) -> Result<Device> {
        let name = match self.device.as_str() {
            "cuda" => format!("cuda:{}", env.local_rank),
            "cpu" => bail!(
                "rank {} of a launched job: NCCL runs on GPUs, give --device cuda (each \
                 process takes GPU LOCAL_RANK); for ranks as threads on the CPU run one \
                 process (no --nproc, no launcher, RANK/WORLD_SIZE unset)",
                env.rank
            ),
            other => bail!(
                "--device `{other}` under a launch: every process takes GPU LOCAL_RANK \
                 ({} here), give --device cuda",
                env.local_rank
            ),
        };
        DeviceArgs {
            device: name,
            ..self.clone()
        }
        .device()
    }
}

/// The H100/H200 SXM dense bf16 datasheet peak, TFLOP/s (the other MFU reference).
pub const DATASHEET_PEAK_TFLOPS: f64 = 989.0;

/// What [`matmul_ceiling`] timed: cuBLASLt on CUDA bf16/f16 (a `cuda` build), else
/// Burn's matmul.
pub fn matmul_ceiling_impl(device: &Device) -> &'static str {
    #[cfg(feature = "cuda")]
    if longview_kernels::gemm::applies(device, device.settings().float_dtype.into()) {
        return "cuBLASLt";
    }
    let _ = device;
    "Burn matmul"
}

/// Dense matmul rate of `device` in TFLOP/s at its float dtype: ten timed 8192^3
/// products after two warm-up ones, through cuBLASLt where the models' linear layers
/// use it ([`matmul_ceiling_impl`]): the measured ceiling MFU is stated against.
pub fn matmul_ceiling(device: &Device) -> Result<f64> {
    use burn::tensor::{Distribution, Tensor};
    const N: usize = 8192;
    let a = Tensor::<2>::random([N, N], Distribution::Default, device);
    let b = Tensor::<2>::random([N, N], Distribution::Default, device);
    let sync = || {
        device
            .sync()
            .map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))
    };
    let product = || {
        #[cfg(feature = "cuda")]
        {
            longview_kernels::gemm::matmul_2d(a.clone(), b.clone(), Default::default())
        }
        #[cfg(not(feature = "cuda"))]
        {
            a.clone().matmul(b.clone())
        }
    };
    // Results are kept until the sync so that no backend can skip the work.
    let warm: Vec<_> = (0..2).map(|_| product()).collect();
    sync()?;
    drop(warm);
    let start = std::time::Instant::now();
    let timed: Vec<_> = (0..10).map(|_| product()).collect();
    sync()?;
    drop(timed);
    Ok(10.0 * 2.0 * (N as f64).powi(3) / start.elapsed().as_secs_f64() / 1e12)
}

/// Appends one JSON object per line to `path` (created if missing): the `--json` output
/// of the benchmarks.
pub fn append_json_lines(path: &std::path::Path, lines: &[serde_json::Value]) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("{}: cannot open for appending", path.display()))?;
    for line in lines {
        writeln!(file, "{line}").with_context(|| format!("{}: write failed", path.display()))?;
    }
    Ok(())
}

/// Refuses a CPU run whose parameters, gradients and optimizer state cannot fit in
/// the memory available now (`copies` full-size copies of the parameters at the
/// device dtype), instead of letting the allocator abort mid-run.
pub fn check_cpu_memory(args: &DeviceArgs, params: usize, copies: usize) -> Result<()> {
    if args.device != "cpu" {
        return Ok(());
    }
    let bytes_per = match args.dtype.as_str() {
        "f32" => 4,
        _ => 2,
    };
    let needed = (params * bytes_per * copies) as f64;
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let available_kib = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok());
    if let Some(kib) = available_kib {
        let available = kib * 1024.0;
        if needed > available {
            bail!(
                "{:.1}M parameters need about {:.1} GiB ({copies} copies at {}) but {:.1} GiB of memory is available: use a smaller --size or a GPU",
                params as f64 / 1e6,
                needed / (1u64 << 30) as f64,
                args.dtype,
                available / (1u64 << 30) as f64
            );
        }
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn cuda_device(name: &str) -> Result<Device> {
    let index = match name.strip_prefix("cuda:") {
        Some(i) => i
            .parse::<usize>()
            .with_context(|| format!("--device `{name}`: `{i}` is not a GPU index"))?,
        None => 0,
    };
    // CubeCL panics on a GPU that does not exist; say which flag asked for it.
    let count = longview_kernels::device_memory::gpu_count()
        .map_err(|e| anyhow::anyhow!("--device `{name}`: {e}"))?;
    if index >= count {
        bail!(
            "--device `{name}`: GPU {index} does not exist, the CUDA driver sees {count} \
             (CUDA_VISIBLE_DEVICES={}); under --nproc or a launcher each process takes GPU \
             LOCAL_RANK, so start at most {count} processes on this machine",
            std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into())
        );
    }
    Ok(Device::cuda(index))
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(name: &str) -> Result<Device> {
    bail!(
        "--device `{name}`: this binary was built without the `cuda` feature (use `cargo xtask bench --cuda` or `cargo xtask package`)"
    )
}

#[cfg(test)]
mod tests {
    use super::DeviceArgs;

    /// A launched rank builds its device after the command built the same one: the
    /// second `device()` must not fail on the already locked dtype (it did on the GPU,
    /// `cannot use dtype bf16 on cuda:0`, for every one-rank NCCL job). f32 only: the
    /// CPU device is shared by every test of this process and f32 is its default.
    #[test]
    fn the_same_device_can_be_asked_for_twice() {
        let args = DeviceArgs {
            device: "cpu".into(),
            dtype: "f32".into(),
            seed: None,
        };
        args.device().expect("first");
        args.device().expect("second, same dtype");
    }
}
