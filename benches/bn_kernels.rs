//! Micro-benchmarks of the fused batch-norm kernels on the W6 shape, (128, 64, 28, 28) float32:
//! each pass alone on plain slices, then the whole layer forward+backward through Burn (fused
//! against the layer composed from tensor ops).
//!
//! `cargo bench --bench bn_kernels`; add `-- --quick` for a short run.

use bnlab::norm::kernels::{self, Dims, Epilogue};
use bnlab::norm::{fused, NormConfig, NormKind, NormLayer};
use burn::tensor::{Device, Distribution, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};

const SHAPE: [usize; 4] = [128, 64, 28, 28];

fn passes(c: &mut Criterion) {
    let dims = Dims::of(&SHAPE);
    let mut rng = rand_pcg::Pcg64::seed_from_u64(0);
    let x: Vec<f32> = (0..dims.len())
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let dy: Vec<f32> = (0..dims.len())
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let gamma = vec![1.0f32; dims.c];
    let beta = vec![0.0f32; dims.c];
    let stats = kernels::channel_stats(&x, dims, 1e-5);
    let sums = kernels::grad_sums(&x, &dy, dims, &stats);
    let plane = (SHAPE[2], SHAPE[3]);

    let mut group = c.benchmark_group("bn_passes");
    group.throughput(Throughput::Bytes((dims.len() * 4) as u64));
    group.bench_function("channel_stats", |b| {
        b.iter(|| kernels::channel_stats(&x, dims, 1e-5))
    });
    group.bench_function("normalize", |b| {
        b.iter(|| kernels::forward(&x, dims, plane, &stats, &gamma, &beta, Epilogue::NONE))
    });
    group.bench_function("grad_sums", |b| {
        b.iter(|| kernels::grad_sums(&x, &dy, dims, &stats))
    });
    group.bench_function("input_grad", |b| {
        b.iter(|| kernels::input_grad(&x, &dy, dims, &stats, &gamma, &sums))
    });
    group.finish();
}

fn layer(c: &mut Criterion) {
    let device = Device::flex().autodiff();
    let x = Tensor::<4>::random(SHAPE, Distribution::Normal(0.0, 1.0), &device).require_grad();
    let g = Tensor::<4>::random(SHAPE, Distribution::Normal(0.0, 1.0), &device);
    let mut group = c.benchmark_group("bn2d_64_fwd_bwd");
    group.sample_size(20);
    for kind in [NormKind::Fused, NormKind::Scratch] {
        let bn = NormLayer::new(&NormConfig::of(kind), 64, &device).expect("a BN layer");
        group.bench_function(format!("{kind:?}").to_lowercase(), |b| {
            b.iter(|| {
                let y = bn.forward(x.clone());
                let grads = fused::backward_with(y, g.clone()).expect("Flex");
                x.grad(&grads).expect("dx")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, passes, layer);
criterion_main!(benches);
