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

pub fn run(client: &Client) {
    report("wgmma checks", check::check_tile_products(client));
    report("wgmma forward checks", check::check_forward(client));
    report(
        "flash_forward routed to wgmma checks",
        check::check_forward_routed(client),
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
}
