//! The ring's transfers overlap its block computation, as the scaling model
//! (`benchmarks/scaling.md`) assumes: each step's K/V transfer is posted before the
//! step's block is computed, and in the backward the dK/dV accumulated for the next
//! block travel while this step computes, so a step costs `max(compute, transfer)`,
//! not their sum.
//!
//! The ranks are threads whose messages cross simulated links
//! (`longview_comm::LinkModel`: a fixed latency per message). The test first times the
//! ring with instant links (`T0`: compute only, `c = T0 / P` a step, non-causal so
//! every step computes a whole block), then with a latency `L = 1.5 c` per message.
//! At P = 4:
//!
//! - forward, overlapped (the model): `(P - 1) max(c, L) + c = 1.375 T0`; serialised
//!   (transfer after compute): `P c + (P - 1) L = 2.125 T0`;
//! - backward, overlapped: `(P - 1) max(c, L) + c + L` (the last dK/dV hop home is
//!   exposed) `= 1.75 T0`; with each dK/dV hop waited at once (the code before
//!   2026-12-05): `(P - 1) max(c, L) + c + P L = 2.875 T0`.
//!
//! The measured time must be within 0.3 T0 of the overlapped prediction and below the
//! midpoint of the two. Timings are wall-clock over sleeps (the link) and CPU work;
//! the margins hold with the four ranks sharing two cores (the numbers are printed by
//! `cargo test -p longview-parallel --test overlap -- --nocapture`). This file is its
//! own test binary so that no other test competes for the cores while it runs.

use std::time::{Duration, Instant};

use burn::tensor::{Device, Distribution, Tensor};
use longview_comm::{Communicator, LinkModel, LocalComm, LocalWorld, ReduceOp};
use longview_parallel::ring::{RingAttention, RingBalance};

const WORLD: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Forward,
    Backward,
}

/// Seconds for one ring forward or backward on every rank (the slowest rank), best
/// of `reps`.
fn ring_s(comms: impl Fn() -> Vec<LocalComm>, pass: Pass, reps: usize) -> f64 {
    let device = Device::flex();
    device.seed(3);
    // [batch, heads, local tokens, head dim] per rank: q, k, v, dO.
    let shape = [1, 8, 384, 64];
    let shards: Vec<[Tensor<4>; 4]> = (0..WORLD)
        .map(|_| {
            [0, 1, 2, 3]
                .map(|_| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device))
        })
        .collect();
    let attention = RingAttention {
        balance: RingBalance::Plain,
        causal: false,
        scale: 0.125,
    };
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let times: Vec<f64> = std::thread::scope(|scope| {
            let handles: Vec<_> = comms()
                .into_iter()
                .map(|comm| {
                    let [q, k, v, d_o] = shards[comm.rank()].clone();
                    scope.spawn(move || {
                        let line_up = || {
                            comm.all_reduce(Tensor::<1>::zeros([1], &Device::flex()), ReduceOp::Sum)
                                .unwrap()
                        };
                        line_up();
                        let start = Instant::now();
                        let (o, lse) = attention
                            .forward(&comm, q.clone(), k.clone(), v.clone())
                            .unwrap();
                        let _ = o.clone().into_data();
                        if pass == Pass::Forward {
                            return start.elapsed().as_secs_f64();
                        }
                        line_up();
                        let start = Instant::now();
                        let (d_q, _, _) =
                            attention.backward(&comm, (q, k, v), o, lse, d_o).unwrap();
                        let _ = d_q.into_data();
                        start.elapsed().as_secs_f64()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        best = best.min(times.into_iter().fold(0.0, f64::max));
    }
    best
}

/// Times `pass` with instant links and with `L = 1.5 c`, prints both against the
/// model, and checks the measured time against the overlapped prediction.
fn check_overlap(pass: Pass) {
    let instant = LinkModel {
        latency: Duration::ZERO,
        bytes_per_s: f64::INFINITY,
    };
    // Warm-up, then the compute-only time.
    ring_s(
        || LocalWorld::communicators_with_links(WORLD, instant),
        pass,
        1,
    );
    let t0 = ring_s(
        || LocalWorld::communicators_with_links(WORLD, instant),
        pass,
        3,
    );
    let c = t0 / WORLD as f64;
    let latency = 1.5 * c;
    let slow = LinkModel {
        latency: Duration::from_secs_f64(latency),
        bytes_per_s: f64::INFINITY,
    };
    let measured = ring_s(
        || LocalWorld::communicators_with_links(WORLD, slow),
        pass,
        3,
    );
    let steps = (WORLD - 1) as f64;
    let (overlapped, serialised) = match pass {
        Pass::Forward => (
            steps * c.max(latency) + c,
            WORLD as f64 * c + steps * latency,
        ),
        Pass::Backward => (
            steps * c.max(latency) + c + latency,
            steps * c.max(latency) + c + WORLD as f64 * latency,
        ),
    };
    println!(
        "{pass:?}, P {WORLD}: compute only {:.1} ms ({:.1} ms a step), latency {:.1} ms a \
         message; measured {:.1} ms, overlapped model {:.1} ms, serialised {:.1} ms",
        1e3 * t0,
        1e3 * c,
        1e3 * latency,
        1e3 * measured,
        1e3 * overlapped,
        1e3 * serialised
    );
    assert!(
        t0 >= 0.02,
        "{pass:?}: the blocks take {:.1} ms: too short to time against thread wake-ups",
        1e3 * t0
    );
    assert!(
        measured >= steps * latency,
        "{pass:?}: {:.1} ms is less than the {} transfers' latency alone",
        1e3 * measured,
        WORLD - 1
    );
    assert!(
        (measured - overlapped).abs() <= 0.3 * t0 && measured < 0.5 * (overlapped + serialised),
        "{pass:?}: measured {:.1} ms; the overlapped model says {:.1} ms, serialised {:.1} ms",
        1e3 * measured,
        1e3 * overlapped,
        1e3 * serialised
    );
}

#[test]
fn ring_transfers_hide_behind_the_block_computation() {
    // One test, so that the two timings never run at the same time.
    check_overlap(Pass::Forward);
    check_overlap(Pass::Backward);
}
