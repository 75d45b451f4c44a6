//! Sharding layouts against hand-written token assignments, and label handling.

use burn::tensor::{Device, Int, Tensor, TensorData};
use longview_parallel::layout::{SeqLayout, count_supervised, shard, shift_labels, unshard};

#[test]
fn layouts_assign_the_documented_tokens() {
    // 16 tokens, 2 ranks. Zigzag: chunks of 4; rank 0 holds chunks 0 and 3.
    assert_eq!(
        SeqLayout::Contiguous.positions(16, 1, 2).unwrap(),
        (8..16).collect::<Vec<_>>()
    );
    assert_eq!(
        SeqLayout::Zigzag.positions(16, 0, 2).unwrap(),
        vec![0, 1, 2, 3, 12, 13, 14, 15]
    );
    assert_eq!(
        SeqLayout::Zigzag.positions(16, 1, 2).unwrap(),
        vec![4, 5, 6, 7, 8, 9, 10, 11]
    );
    // 2D with Ulysses 2 x ring 2 over 16 tokens: ring position 0 holds the pair
    // [0..4] ++ [12..16], cut in two: rank 0 gets 0..4, rank 1 gets 12..16; ring
    // position 1 holds [4..8] ++ [8..12]: ranks 2 and 3.
    let two_d = SeqLayout::TwoD { ulysses: 2 };
    assert_eq!(two_d.positions(16, 0, 4).unwrap(), vec![0, 1, 2, 3]);
    assert_eq!(two_d.positions(16, 1, 4).unwrap(), vec![12, 13, 14, 15]);
    assert_eq!(two_d.positions(16, 2, 4).unwrap(), vec![4, 5, 6, 7]);
    assert_eq!(two_d.positions(16, 3, 4).unwrap(), vec![8, 9, 10, 11]);
    // Ulysses 4 x ring 1 over 16: the pair [0..8] ++ [8..16] cut four ways; a piece may
    // straddle the two chunks when the cut does not fall on the boundary.
    let four = SeqLayout::TwoD { ulysses: 4 };
    assert_eq!(four.positions(16, 1, 4).unwrap(), vec![4, 5, 6, 7]);
    // Ulysses 3 x ring 2 over 12 tokens: ring position 0 holds [0..3] ++ [9..12], cut
    // in three pieces of 2: rank 1 gets token 2 and token 9.
    let three_way = SeqLayout::TwoD { ulysses: 3 };
    assert_eq!(three_way.positions(12, 0, 6).unwrap(), vec![0, 1]);
    assert_eq!(three_way.positions(12, 1, 6).unwrap(), vec![2, 9]);
    assert_eq!(three_way.positions(12, 2, 6).unwrap(), vec![10, 11]);
    assert_eq!(three_way.positions(12, 3, 6).unwrap(), vec![3, 4]);
}

#[test]
fn every_layout_is_a_partition_and_unshard_inverts_shard() {
    let device = Device::flex();
    for (layout, world, len) in [
        (SeqLayout::Contiguous, 4, 12),
        (SeqLayout::Zigzag, 4, 24),
        (SeqLayout::TwoD { ulysses: 2 }, 4, 24),
        (SeqLayout::TwoD { ulysses: 4 }, 8, 48),
        (SeqLayout::TwoD { ulysses: 3 }, 6, 24),
    ] {
        let mut seen: Vec<usize> = (0..world)
            .flat_map(|r| layout.positions(len, r, world).unwrap())
            .collect();
        seen.sort();
        assert_eq!(seen, (0..len).collect::<Vec<_>>(), "{layout} P={world}");
        let tokens = Tensor::<2, Int>::from_data(
            TensorData::new((0..len as i64).collect::<Vec<_>>(), [1, len]),
            &device,
        );
        let parts: Vec<_> = (0..world)
            .map(|r| shard(tokens.clone(), 1, layout, r, world).unwrap())
            .collect();
        for (r, part) in parts.iter().enumerate() {
            let got: Vec<i64> = part.to_data().iter::<i64>().collect();
            let want: Vec<i64> = layout
                .positions(len, r, world)
                .unwrap()
                .into_iter()
                .map(|p| p as i64)
                .collect();
            assert_eq!(got, want, "{layout} rank {r}");
        }
        let back: Vec<i64> = unshard(parts, 1, layout)
            .unwrap()
            .to_data()
            .iter::<i64>()
            .collect();
        assert_eq!(back, (0..len as i64).collect::<Vec<_>>());
    }
}

#[test]
fn labels_are_shifted_globally_before_sharding() {
    let device = Device::flex();
    let labels = Tensor::<2, Int>::from_data(
        TensorData::new(vec![-100i64, -100, 5, 6, 7, 8, -100, 9], [1, 8]),
        &device,
    );
    let shifted = shift_labels(labels);
    let want = vec![-100i64, 5, 6, 7, 8, -100, 9, -100];
    assert_eq!(shifted.to_data().iter::<i64>().collect::<Vec<_>>(), want);
    // Sharded zigzag over 2 ranks, the targets at shard boundaries survive: the
    // per-rank counts add up to the global count.
    let total: usize = (0..2)
        .map(|r| count_supervised(&shard(shifted.clone(), 1, SeqLayout::Zigzag, r, 2).unwrap()))
        .sum();
    assert_eq!(total, 5);
    assert_eq!(count_supervised(&shifted), 5);
}
