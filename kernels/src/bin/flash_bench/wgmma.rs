//! `flash_bench --wgmma`: the warpgroup MMA helpers and the wgmma forward and backward
//! (`longview_kernels::wgmma`) checked against f64, then the instruction's own rate and the
//! forward's speed at the benchmark shapes.

use std::time::Instant;

use cubecl::prelude::*;
use half::bf16;
use longview_kernels::DeviceTensor;
use longview_kernels::reference::random_values;
use longview_kernels::wgmma::{check, forward, throughput};

fn report(what: &str, result: Result<(Vec<String>, Vec<String>), longview_kernels::AttnError>) {
    match result {
        Ok((passed, failed)) => {
            for line in passed.iter().chain(&failed) {
                println!("{line}");
            }
            println!("{what}: {} passed, {} failed", passed.len(), failed.len());
        }
        Err(e) => println!("{what} did not run: {e}"),
    }
}

/// Times the wgmma forward (`reps` calls after one untimed) at B1 `heads` S `seq` D128.
fn time_forward(client: &Client, (heads, kv_heads): (usize, usize), seq: usize, causal: bool) {
    let upload = |h: usize, seed: u64| {
        let x: Vec<bf16> = random_values(h * seq * 128, seed)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        DeviceTensor::from_slice(client, &x, &[1, h, seq, 128])
    };
    let (q, k, v) = (upload(heads, 1), upload(kv_heads, 2), upload(kv_heads, 3));
    let shape = forward::ForwardShape {
        batch: 1,
        heads,
        kv_heads,
        seq_q: seq,
        seq_k: seq,
        head_dim: 128,
        causal,
    };
    let sync = || cubecl::future::block_on(client.sync()).expect("device sync");
    let reps = 3;
    let run = || forward::forward(client, &q, &k, &v, shape).map(|_| ());
    if let Err(e) = run() {
        println!(
            "| wgmma forward | B1 H{heads}/{kv_heads} S{seq} | causal {causal} | failed: {e} |"
        );
        return;
    }
    sync();
    let started = Instant::now();
    for _ in 0..reps {
        run().expect("ran once already");
    }
    sync();
    let seconds = started.elapsed().as_secs_f64() / reps as f64;
    let flops = 4.0 * heads as f64 * (seq as f64).powi(2) * 128.0 / if causal { 2.0 } else { 1.0 };
    println!(
        "| wgmma forward | B1 H{heads}/{kv_heads} S{seq} D128 | {} | {:.2} ms | {:.1} TFLOP/s |",
        if causal { "causal" } else { "full" },
        seconds * 1e3,
        flops / seconds / 1e12
    );
}

/// Times one chunked-prefill attention call through `flash_forward` (kernel `Auto`): a
/// chunk of `chunk` queries (the 1.5B's 12 query / 2 kv heads, D128) against a cache of
/// `cached + chunk` keys, causal with the chunk after the cached keys, on the wgmma forward
/// and on the `mma.sync` kernels (`LONGVIEW_FLASH_WGMMA=0`) in turn.
fn time_prefill_chunk(client: &Client, chunk: usize, cached: usize) {
    use longview_kernels::flash::flash_forward_into;
    let (heads, kv_heads, keys) = (12usize, 2usize, cached + chunk);
    let upload = |h: usize, rows: usize, seed: u64| {
        let x: Vec<bf16> = random_values(h * rows * 128, seed)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        DeviceTensor::from_slice(client, &x, &[1, h, rows, 128])
    };
    let q = upload(heads, chunk, 1);
    let (k, v) = (upload(kv_heads, keys, 2), upload(kv_heads, keys, 3));
    let o = DeviceTensor::poisoned::<bf16>(client, 0.0, &[1, heads, chunk, 128]);
    let lse = DeviceTensor::poisoned::<f32>(client, 0.0, &[1, heads, chunk]);
    let options = longview_kernels::FlashOptions::new(128)
        .causal(true)
        .offsets(cached, 0);
    let sync = || cubecl::future::block_on(client.sync()).expect("device sync");
    // Query i sees cached + i + 1 keys.
    let pairs = chunk as f64 * (cached as f64 + (chunk as f64 + 1.0) / 2.0);
    let flops = 4.0 * heads as f64 * 128.0 * pairs;
    for wgmma in ["1", "0"] {
        // SAFETY: single-threaded benchmark; the switch is read at each call.
        unsafe { std::env::set_var("LONGVIEW_FLASH_WGMMA", wgmma) };
        let run = || flash_forward_into::<bf16>(client, &q, &k, &v, &o, &lse, &options);
        let kernel = if wgmma == "1" { "wgmma" } else { "mma.sync" };
        if let Err(e) = run() {
            println!("| prefill chunk {chunk} after {cached} | {kernel} | failed: {e} | |");
            continue;
        }
        sync();
        let reps = 3;
        let started = Instant::now();
        for _ in 0..reps {
            run().expect("ran once already");
        }
        sync();
        let seconds = started.elapsed().as_secs_f64() / reps as f64;
        println!(
            "| prefill chunk {chunk} after {cached}, H12/2 D128 causal | {kernel} | {:.2} ms | {:.1} TFLOP/s |",
            seconds * 1e3,
            flops / seconds / 1e12
        );
    }
    unsafe { std::env::remove_var("LONGVIEW_FLASH_WGMMA") };
}

pub fn run(client: &Client) {
    report("wgmma checks", check::check_tile_products(client));
    report("wgmma forward checks", check::check_forward(client));
    report(
        "flash_forward routed to wgmma checks",
        check::check_forward_routed(client),
    );
    // The shifted causal calls can be turned off (`wgmma::forward::shifted_enabled`): on for the
    // checks and the prefill timings below, whatever the caller's environment.
    // SAFETY: single-threaded benchmark.
    unsafe { std::env::set_var("LONGVIEW_FLASH_WGMMA_SHIFTED", "1") };
    report(
        "flash_forward shifted-causal (chunked prefill) checks",
        check::check_forward_shifted(client),
    );
    report(
        "flash_backward shifted-causal checks",
        longview_kernels::wgmma::check_backward::check_backward_shifted(client),
    );
    report(
        "flash_backward routed to wgmma checks",
        longview_kernels::wgmma::check_backward::check_backward(client),
    );
    println!("| cubes | warpgroups a cube | products a warpgroup | ms | TFLOP/s |");
    println!("|---|---|---|---|---|");
    for warpgroups in [1usize, 2, 3] {
        for per_sm in [1u32, 2, 4, 8] {
            let cubes = 132 * per_sm;
            match throughput(client, cubes, warpgroups, 4000) {
                Ok(run) => println!(
                    "| {cubes} | {warpgroups} | {} | {:.2} | {:.1} |",
                    run.iterations,
                    run.seconds * 1e3,
                    run.tflops
                ),
                Err(e) => println!("| {cubes} | {warpgroups} | failed: {e} | | |"),
            }
        }
    }
    println!("| kernel | shape | mask | time | rate |");
    println!("|---|---|---|---|---|");
    for causal in [true, false] {
        time_forward(client, (16, 16), 32768, causal);
    }
    time_forward(client, (12, 2), 32768, true);
    time_forward(client, (28, 4), 32768, true);
    println!("| call | kernel | time | rate |");
    println!("|---|---|---|---|");
    for cached in [0usize, 24576, 196608] {
        time_prefill_chunk(client, 8192, cached);
    }
}
