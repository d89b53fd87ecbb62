//! Time to generate and write a synthetic fleet to the surveillance layout (10 devices
//! x 7 days at one reading a minute, ~100k events).

use criterion::{Criterion, criterion_group, criterion_main};
use vitalmq_bridge::surveillance::synth::{SynthConfig, generate};

fn synth_week(c: &mut Criterion) {
    let mut group = c.benchmark_group("surveillance");
    group.sample_size(10);
    group.bench_function("synth_10_devices_7_days", |b| {
        b.iter(|| {
            let dir = tempfile::tempdir().expect("dir");
            generate(&SynthConfig::default(), dir.path()).expect("generate")
        });
    });
    group.finish();
}

criterion_group!(benches, synth_week);
criterion_main!(benches);
