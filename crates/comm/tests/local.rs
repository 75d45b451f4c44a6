//! The in-process communicator: every collective against values computed by hand from
//! the ranks' inputs, sub-group isolation, and the failure modes (mismatched
//! collectives, a rank that dies, a peer that never sends) ending in errors.

use std::time::Duration;

use burn::tensor::{DType, Device, Tensor, TensorData};
use longview_comm::{CommError, Communicator, LocalComm, LocalWorld, ReduceOp};

fn on_ranks<T: Send>(comms: Vec<LocalComm>, work: impl Fn(LocalComm) -> T + Sync) -> Vec<T> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| scope.spawn(|| work(comm)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank panicked"))
            .collect()
    })
}

/// Rank `r`'s input: `[2, 3]` with element `i` = `100 r + i`.
fn input(rank: usize) -> Tensor<2> {
    let values: Vec<f32> = (0..6).map(|i| (100 * rank + i) as f32).collect();
    Tensor::from_data(TensorData::new(values, [2, 3]), &Device::flex())
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

#[test]
fn collectives_compute_what_they_promise() {
    for world in [1, 2, 3, 4, 8] {
        let results = on_ranks(LocalWorld::communicators(world), |comm| {
            let r = comm.rank();
            let sum = comm.all_reduce(input(r), ReduceOp::Sum).unwrap();
            let max = comm.all_reduce(input(r), ReduceOp::Max).unwrap();
            let gathered = comm.all_gather(input(r), 0).unwrap();
            // Reduce-scatter along a dim of length 2 * world.
            let wide = Tensor::<2>::cat((0..world).map(|_| input(r)).collect(), 1);
            let scattered = comm.reduce_scatter(wide, 1, ReduceOp::Sum).unwrap();
            let root = world - 1;
            let broadcast = comm.broadcast(input(r), root).unwrap();
            // Part j carries (sender, receiver) so routing is visible.
            let parts = (0..world)
                .map(|j| {
                    Tensor::<1>::from_data(
                        TensorData::new(vec![r as f32, j as f32], [2]),
                        &Device::flex(),
                    )
                })
                .collect();
            let routed = comm.all_to_all(parts).unwrap();
            (r, sum, max, gathered, scattered, broadcast, routed)
        });
        for (r, sum, max, gathered, scattered, broadcast, routed) in results {
            let ranks_sum = (world * (world - 1) / 2) as f32;
            let want_sum: Vec<f32> = (0..6)
                .map(|i| 100.0 * ranks_sum + (world * i) as f32)
                .collect();
            assert_eq!(values(sum), want_sum, "all_reduce sum, world {world}");
            assert_eq!(values(max), values(input(world - 1)), "all_reduce max");
            let want_gather: Vec<f32> = (0..world).flat_map(|s| values(input(s))).collect();
            assert_eq!(gathered.dims(), [2 * world, 3]);
            assert_eq!(values(gathered), want_gather, "all_gather");
            // Column block r of the summed [2, 3 world] tensor is the summed input.
            assert_eq!(scattered.dims(), [2, 3]);
            assert_eq!(values(scattered), want_sum, "reduce_scatter rank {r}");
            assert_eq!(values(broadcast), values(input(world - 1)), "broadcast");
            for (i, t) in routed.into_iter().enumerate() {
                assert_eq!(
                    values(t),
                    vec![i as f32, r as f32],
                    "all_to_all from {i} to {r}"
                );
            }
        }
    }
}

#[test]
fn point_to_point_keeps_order_and_dtype() {
    let results = on_ranks(LocalWorld::communicators(4), |comm| {
        let (r, p) = (comm.rank(), comm.world_size());
        let device = Device::flex();
        let first = input(r).cast(DType::BF16);
        let second = input(r) * 2.0;
        comm.send(&first, (r + 1) % p).unwrap();
        comm.send(&second, (r + 1) % p).unwrap();
        let a: Tensor<2> = comm.recv((r + p - 1) % p, &device).unwrap();
        let b: Tensor<2> = comm.recv((r + p - 1) % p, &device).unwrap();
        (r, a, b)
    });
    for (r, a, b) in results {
        let from = (r + 3) % 4;
        assert_eq!(a.dtype(), DType::BF16);
        let sent = input(from).cast(DType::BF16).cast(DType::F32);
        assert_eq!(values(a.cast(DType::F32)), values(sent));
        assert_eq!(values(b), values(input(from) * 2.0));
    }
}

#[test]
fn sub_groups_number_their_members_and_keep_their_traffic_apart() {
    let results = on_ranks(LocalWorld::communicators(6), |comm| {
        // Contiguous pairs and strided triples, as 2D attention uses them.
        let pairs = comm.split(&[vec![0, 1], vec![2, 3], vec![4, 5]]).unwrap();
        let strided = comm.split(&[vec![0, 2, 4], vec![1, 3, 5]]).unwrap();
        let r = comm.rank() as f32;
        let t = || Tensor::<1>::from_data(TensorData::new(vec![r], [1]), &Device::flex());
        // Interleave operations on the three groups; each must see only its own.
        let pair_sum = pairs.all_reduce(t(), ReduceOp::Sum).unwrap();
        let all_sum = comm.all_reduce(t(), ReduceOp::Sum).unwrap();
        let strided_gather = strided.all_gather(t(), 0).unwrap();
        (
            comm.rank(),
            pairs.rank(),
            strided.rank(),
            pair_sum,
            all_sum,
            strided_gather,
        )
    });
    for (r, pair_rank, strided_rank, pair_sum, all_sum, strided_gather) in results {
        assert_eq!(pair_rank, r % 2);
        assert_eq!(strided_rank, r / 2);
        let pair_start = r - r % 2;
        assert_eq!(values(pair_sum), vec![(2 * pair_start + 1) as f32]);
        assert_eq!(values(all_sum), vec![15.0]);
        let first = r % 2;
        assert_eq!(
            values(strided_gather),
            vec![first as f32, (first + 2) as f32, (first + 4) as f32]
        );
    }
}

#[test]
fn bad_arguments_are_errors_naming_the_rank_and_operation() {
    let results = on_ranks(LocalWorld::communicators(2), |comm| {
        let odd = Tensor::<2>::zeros([3, 3], &Device::flex());
        let scatter = comm
            .reduce_scatter(odd, 0, ReduceOp::Sum)
            .unwrap_err()
            .to_string();
        let split = comm.split(&[vec![0], vec![0, 1]]).unwrap_err().to_string();
        let send = comm.send(&input(0), 5).unwrap_err().to_string();
        // NCCL's contract: tensors without autodiff. Refused before any message is
        // posted, on every rank alike, so nothing is left half sent.
        let tracked = Tensor::<1>::ones([2], &Device::flex().autodiff());
        let autodiff = comm
            .all_reduce(tracked, ReduceOp::Sum)
            .unwrap_err()
            .to_string();
        // NCCL sizes the gather's buffers alike on every rank: unequal parts refused.
        let part = Tensor::<1>::ones([2 + comm.rank()], &Device::flex());
        let gather = comm.all_gather(part, 0).unwrap_err().to_string();
        (scatter, split, send, autodiff, gather)
    });
    for (scatter, split, send, autodiff, gather) in results {
        assert!(
            gather.contains("all_gather") && gather.contains("shapes and dtypes must match"),
            "{gather}"
        );
        assert!(
            autodiff.contains("all_reduce") && autodiff.contains("without autodiff"),
            "{autodiff}"
        );
        assert!(
            scatter.contains("reduce_scatter") && scatter.contains("divisible by the 2 ranks"),
            "{scatter}"
        );
        assert!(
            split.contains("rank 0 appears in more than one sub-group"),
            "{split}"
        );
        assert!(
            send.contains("rank 5 is out of range for a group of 2"),
            "{send}"
        );
    }
}

#[test]
fn mismatched_collectives_fail_instead_of_mixing_data() {
    let results = on_ranks(
        LocalWorld::communicators_with_timeout(2, Duration::from_secs(5)),
        |comm| {
            if comm.rank() == 0 {
                comm.all_reduce(input(0), ReduceOp::Sum).map(|_| ())
            } else {
                comm.all_gather(input(1), 0).map(|_| ())
            }
        },
    );
    for (rank, result) in results.into_iter().enumerate() {
        match result {
            Err(CommError::Mismatch {
                rank: r,
                expected,
                found,
                ..
            }) => {
                assert_eq!(r, rank);
                assert_ne!(expected, found);
            }
            other => panic!("rank {rank}: expected a mismatch error, got {other:?}"),
        }
    }
}

#[test]
fn a_rank_that_dies_ends_its_peers_waits_with_an_error() {
    let results = on_ranks(LocalWorld::communicators(3), |comm| {
        if comm.rank() == 2 {
            // Leaves without taking part (as a panicking rank does while unwinding).
            drop(comm);
            return None;
        }
        Some(comm.all_reduce(input(0), ReduceOp::Sum).map(|_| ()))
    });
    for result in results.into_iter().flatten() {
        match result {
            Err(e @ CommError::PeerGone { peer: 2, .. }) => {
                assert!(e.to_string().contains("rank 2 left the group"), "{e}");
            }
            other => panic!("expected PeerGone from rank 2, got {other:?}"),
        }
    }
}

#[test]
fn a_peer_that_never_sends_times_out() {
    let results = on_ranks(
        LocalWorld::communicators_with_timeout(2, Duration::from_millis(200)),
        |comm| {
            if comm.rank() == 1 {
                // Alive but busy elsewhere for longer than the timeout.
                std::thread::sleep(Duration::from_millis(600));
                return None;
            }
            Some(comm.recv::<2, burn::tensor::Float>(1, &Device::flex()))
        },
    );
    match &results[0] {
        Some(Err(e @ CommError::Timeout { peer: 1, .. })) => {
            assert!(e.to_string().contains("gave up after"), "{e}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[test]
fn ring_shifts_pair_up_and_check_shapes() {
    let results = on_ranks(LocalWorld::communicators(4), |comm| {
        let (r, p) = (comm.rank(), comm.world_size());
        let first = comm
            .start_shift(&input(r), (r + 1) % p, (r + p - 1) % p)
            .unwrap();
        let second = comm
            .start_shift(&(input(r) * 3.0), (r + 1) % p, (r + p - 1) % p)
            .unwrap();
        (r, first.wait().unwrap(), second.wait().unwrap())
    });
    for (r, a, b) in results {
        let from = (r + 3) % 4;
        assert_eq!(values(a), values(input(from)));
        assert_eq!(values(b), values(input(from) * 3.0));
    }
    let errors = on_ranks(LocalWorld::communicators(2), |comm| {
        let shape = if comm.rank() == 0 { [2, 3] } else { [3, 2] };
        let t = Tensor::<2>::zeros(shape, &Device::flex());
        let other = 1 - comm.rank();
        comm.start_shift(&t, other, other)
            .unwrap()
            .wait()
            .unwrap_err()
            .to_string()
    });
    for e in errors {
        assert!(
            e.contains("shifted a [") && e.contains("tensor, this rank a"),
            "{e}"
        );
    }
}

#[test]
fn a_simulated_link_delays_by_latency_and_serialises_by_bandwidth() {
    use longview_comm::LinkModel;
    use std::time::Instant;
    // 256 KiB messages at 4 MiB/s: 62.5 ms on the wire each, plus 40 ms of latency.
    let link = LinkModel {
        latency: Duration::from_millis(40),
        bytes_per_s: 4.0 * 1024.0 * 1024.0,
    };
    let message = || Tensor::<1>::zeros([64 * 1024], &Device::flex());
    // Arrival times count from before either rank starts, so they bound the delay
    // from below whatever order the threads start in (the sends come later still).
    let start = Instant::now();
    let arrivals = on_ranks(LocalWorld::communicators_with_links(2, link), |comm| {
        if comm.rank() == 0 {
            let sent = Instant::now();
            comm.send(&message(), 1).unwrap();
            comm.send(&message(), 1).unwrap();
            // Sending does not wait for the link.
            assert!(sent.elapsed() < Duration::from_millis(30));
            Vec::new()
        } else {
            (0..2)
                .map(|_| {
                    let got: Tensor<1> = comm.recv(0, &Device::flex()).unwrap();
                    assert_eq!(got.dims(), [64 * 1024]);
                    start.elapsed().as_secs_f64()
                })
                .collect()
        }
    });
    let (first, second) = (arrivals[1][0], arrivals[1][1]);
    // Each arrival is at least the link's delay after the send, and the send came
    // after `start`; upper bounds leave room for a busy machine.
    assert!(
        (0.1025 - 0.001..0.5).contains(&first),
        "first arrived after {first:.3} s"
    );
    assert!(
        (0.165 - 0.001..0.6).contains(&second),
        "second arrived after {second:.3} s: the link carries one message at a time"
    );
}
