//! Micro-benchmarks of the fused batch-norm kernels on the W6 shape, (128, 64, 28, 28) float32:
//! each pass alone on plain slices, then the whole layer forward+backward through Burn (fused
//! against the layer composed from tensor ops); and the fused layer with its epilogue on each
//! of LeNet-BN's four BN layers at batch 256, forward+backward.
//!
//! `cargo bench --bench bn_kernels`; add `-- --quick` for a short run.

use bnlab::norm::epilogue::{Activation, Epilogue, Pool};
use bnlab::norm::{NormConfig, NormKind, NormLayer};
use bnlab::ops::batch_norm::{planes, stats};
use bnlab::ops::cpu::Dims;
use bnlab::ops::seeded_backward;
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
    let stats = stats::channel_stats(&x, dims, 1e-5);
    let sums = planes::grad_sums(&x, &dy, dims, &stats);
    let plane = (SHAPE[2], SHAPE[3]);

    let mut group = c.benchmark_group("bn_passes");
    group.throughput(Throughput::Bytes((dims.len() * 4) as u64));
    group.bench_function("channel_stats", |b| {
        b.iter(|| stats::channel_stats(&x, dims, 1e-5))
    });
    group.bench_function("normalize", |b| {
        b.iter(|| planes::forward(&x, dims, plane, &stats, &gamma, &beta, Epilogue::NONE))
    });
    group.bench_function("grad_sums", |b| {
        b.iter(|| planes::grad_sums(&x, &dy, dims, &stats))
    });
    group.bench_function("input_grad", |b| {
        b.iter(|| planes::input_grad(&x, &dy, dims, &stats, &gamma, &sums))
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
                let grads = seeded_backward::backward_with(y, g.clone()).expect("Flex");
                x.grad(&grads).expect("dx")
            })
        });
    }
    group.finish();
}

/// LeNet-BN's BN layers as W1 runs them: BN, sigmoid and (after the convs) a 2×2 average pool.
fn lenet_layers(c: &mut Criterion) {
    let device = Device::flex().autodiff();
    let mut group = c.benchmark_group("lenet_bn_layers_fwd_bwd");
    group.sample_size(30);
    let sigmoid_pool = Epilogue {
        activation: Activation::Sigmoid,
        pool: Pool::Avg(2),
    };
    let sigmoid = Epilogue {
        activation: Activation::Sigmoid,
        pool: Pool::None,
    };
    let bench = |group: &mut criterion::BenchmarkGroup<_>, name: &str, x: Tensor<4>, ep| {
        let bn = NormLayer::new(&NormConfig::of(NormKind::Fused), x.dims()[1], &device)
            .expect("a BN layer");
        let out = ep_output(&x.dims(), ep);
        let g = Tensor::<4>::random(out, Distribution::Normal(0.0, 1.0), &device);
        group.throughput(Throughput::Elements(
            x.dims().iter().product::<usize>() as u64
        ));
        group.bench_function(name, |b| {
            b.iter(|| {
                let y = bn.forward_then(x.clone(), ep);
                let grads = seeded_backward::backward_with(y, g.clone()).expect("Flex");
                x.grad(&grads).expect("dx")
            })
        });
    };
    for (name, shape, ep) in [
        ("conv1_256x6x24x24", [256, 6, 24, 24], sigmoid_pool),
        ("conv2_256x16x8x8", [256, 16, 8, 8], sigmoid_pool),
        // The linear layers' (N, C) input, as (N, C, 1, 1): one value per plane.
        ("fc1_256x120", [256, 120, 1, 1], sigmoid),
        ("fc2_256x84", [256, 84, 1, 1], sigmoid),
    ] {
        let x = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device).require_grad();
        bench(&mut group, name, x, ep);
    }
    group.finish();
}

fn ep_output(shape: &[usize], ep: Epilogue) -> [usize; 4] {
    let out = ep.output_shape(shape).expect("a valid epilogue");
    [out[0], out[1], out[2], out[3]]
}

criterion_group!(benches, passes, layer, lenet_layers);
criterion_main!(benches);
