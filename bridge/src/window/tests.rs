use super::*;

fn w(size: u32) -> WindowSize {
    WindowSize::new(size).expect("valid size")
}

/// Runs `(epoch, seq)` through check + apply, as the pipeline does.
fn feed(state: &mut Option<DeviceSequence>, size: WindowSize, epoch: u64, seq: u64) -> Verdict {
    let verdict = check(state.as_ref(), epoch, seq);
    if let Verdict::Accept(a) = verdict {
        match state {
            Some(s) => s.apply(epoch, seq, a),
            None => *state = Some(DeviceSequence::first(size, epoch, seq)),
        }
    }
    verdict
}

#[test]
fn window_sizes_are_multiples_of_64_up_to_the_maximum() {
    assert!(WindowSize::new(64).is_ok());
    assert!(WindowSize::new(1024).is_ok());
    assert!(WindowSize::new(MAX_WINDOW).is_ok());
    for bad in [0, 1, 63, 65, 100, MAX_WINDOW + 64] {
        assert!(WindowSize::new(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_large_window_accepts_late_numbers_the_default_refuses() {
    for (size, expect_late) in [(64, false), (1024, true)] {
        let mut s = None;
        feed(&mut s, w(size), 1, 0);
        feed(&mut s, w(size), 1, 500);
        let late = feed(&mut s, w(size), 1, 1);
        assert_eq!(
            matches!(late, Verdict::Accept(Accepted::OutOfOrder)),
            expect_late,
            "window {size}"
        );
        if !expect_late {
            assert_eq!(late, Verdict::Reject(Rejected::TooOld));
        }
        // Either way a second copy is never accepted.
        assert!(matches!(feed(&mut s, w(size), 1, 1), Verdict::Reject(_)));
    }
}

#[test]
fn receipts_stop_before_the_lowest_unseen_number() {
    let size = w(64);
    let mut s = None;
    feed(&mut s, size, 3, 0);
    feed(&mut s, size, 3, 1);
    let state = s.as_ref().expect("state");
    assert_eq!(state.receipt(), Some(ReceiptPoint { epoch: 3, seq: 1 }));
    // 2 and 3 missing: the receipt stays at 1 until they arrive.
    feed(&mut s, size, 3, 4);
    assert_eq!(
        s.as_ref().expect("state").receipt(),
        Some(ReceiptPoint { epoch: 3, seq: 1 })
    );
    feed(&mut s, size, 3, 3);
    assert_eq!(
        s.as_ref().expect("state").receipt(),
        Some(ReceiptPoint { epoch: 3, seq: 1 })
    );
    feed(&mut s, size, 3, 2);
    assert_eq!(
        s.as_ref().expect("state").receipt(),
        Some(ReceiptPoint { epoch: 3, seq: 4 })
    );
    // A jump beyond the window: what fell out of it unseen is lost, the receipt moves
    // to just before the lowest unseen number still inside.
    feed(&mut s, size, 3, 200);
    assert_eq!(
        s.as_ref().expect("state").receipt(),
        Some(ReceiptPoint { epoch: 3, seq: 136 })
    );
}

#[test]
fn a_new_epoch_that_does_not_start_at_zero_covers_only_older_epochs() {
    let size = w(64);
    let mut s = None;
    feed(&mut s, size, 0, 5);
    assert_eq!(
        s.as_ref().expect("state").receipt(),
        None,
        "epoch 0, seq 0..4 may still come"
    );
    feed(&mut s, size, 7, 3);
    assert_eq!(
        s.as_ref().expect("state").receipt(),
        Some(ReceiptPoint {
            epoch: 6,
            seq: u64::MAX
        })
    );
    for seq in 0..3 {
        feed(&mut s, size, 7, seq);
    }
    assert_eq!(
        s.as_ref().expect("state").receipt(),
        Some(ReceiptPoint { epoch: 7, seq: 3 })
    );
}

#[test]
fn receipts_at_the_top_of_the_range_do_not_overflow() {
    let size = w(64);
    let mut s = None;
    feed(&mut s, size, u64::MAX, u64::MAX);
    let state = s.as_ref().expect("state");
    assert_eq!(
        state.receipt(),
        Some(ReceiptPoint {
            epoch: u64::MAX,
            seq: u64::MAX - 64
        })
    );
    assert_eq!(
        state.check(u64::MAX, u64::MAX),
        Verdict::Reject(Rejected::Duplicate)
    );
    assert_eq!(
        state.check(u64::MAX - 1, 0),
        Verdict::Reject(Rejected::StaleEpoch)
    );
}

#[test]
fn state_round_trips_through_its_stored_form() {
    let size = w(128);
    let mut s = None;
    for seq in [0, 1, 2, 5, 90, 7, 100] {
        feed(&mut s, size, 9, seq);
    }
    let state = s.expect("state");
    let back = DeviceSequence::restore(size, 128, 9, state.highest(), &state.bitmap_bytes())
        .expect("restore");
    assert_eq!(back, state);
    assert!(DeviceSequence::restore(size, 128, 9, 100, &[0; 3]).is_err());
}

#[test]
fn resizing_never_accepts_a_number_twice() {
    let mut s = None;
    for seq in [0, 10, 60, 61, 62] {
        feed(&mut s, w(64), 1, seq);
    }
    let old = s.expect("state");
    // Grow: numbers below the old window are treated as seen (refused), numbers the old
    // window saw are still seen, unseen ones inside it may still arrive.
    let grown = DeviceSequence::restore(w(256), 64, 1, 62, &old.bitmap_bytes()).expect("grow");
    assert_eq!(grown.check(1, 10), Verdict::Reject(Rejected::Duplicate));
    assert_eq!(grown.check(1, 11), Verdict::Accept(Accepted::OutOfOrder));
    assert_eq!(grown.check(1, 0), Verdict::Reject(Rejected::Duplicate));
    // Shrink: still refuses what it saw.
    let shrunk = DeviceSequence::restore(w(64), 64, 1, 62, &old.bitmap_bytes()).expect("same");
    assert_eq!(shrunk, old);
}

#[test]
fn a_window_of_any_size_matches_a_model_set_of_seen_numbers() {
    // A deterministic pseudo-random walk checked against a plain set.
    for size in [64u32, 128, 1024] {
        let size = w(size);
        let mut s = None;
        let mut seen = std::collections::BTreeSet::new();
        let mut highest = 0u64;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let seq = (x % 3000).saturating_add(highest.saturating_sub(1500));
            let verdict = feed(&mut s, size, 1, seq);
            let low = highest.saturating_sub(u64::from(size.get()) - 1);
            let expected_accept =
                seen.is_empty() || seq > highest || (seq >= low && !seen.contains(&seq));
            assert_eq!(
                matches!(verdict, Verdict::Accept(_)),
                expected_accept,
                "seq {seq} highest {highest}"
            );
            if expected_accept {
                seen.insert(seq);
                highest = highest.max(seq);
            }
        }
    }
}
