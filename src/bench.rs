//! `bnlab bench`: the chapter's workloads timed the way `torch_bench.py` times PyTorch's, so
//! that the two can be put side by side (tools/bench_vs_torch.py).
//!
//! | id | workload | figure |
//! |---|---|---|
//! | W0 | the best matrix product this CPU runs: gemm, f32, 1024³, all threads | GFLOP/s |
//! | W1 | LeNet-BN training, SGD lr 1.0, batch 256, one epoch, per `--norm` | examples/s |
//! | W4 | ResNet-18 on 28×28, batch 128, Adam 1e-3, 30 steps after 3 warm-up | examples/s, conv GFLOP/s |
//! | W5 | DenseNet on 96×96, batch 64, Adam 1e-3, 10 steps after 2 warm-up | examples/s, conv GFLOP/s, peak RSS |
//! | W6 | BatchNorm2d(64) forward+backward on (128,64,28,28), 50 iterations after 5 | ms, GB/s of its least traffic at the median and share of a plain copy's from memory |
//! | W7 | eval-mode inference on the test set, LeNet-BN and ResNet-18 | examples/s |
//! | W8 | W5 at the recipe's batch of 256, 4 steps after 1 warm-up | examples/s, conv GFLOP/s, peak RSS |
//! | RSS | peak resident memory of a LeNet-BN training process (one epoch) | MB |

use std::time::Instant;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::GradientsParams;
use burn::tensor::{Distribution, Tensor};
use serde::Serialize;

use crate::config::{OptimizerKind, RunConfig};
use crate::data::input_batch;
use crate::data::FashionMnist;
use crate::models::{Model, ModelKind, ModelSpec};
use crate::norm::{NormConfig, NormKind, NormLayer};
use crate::train::{self, eval_device, train_device, Quiet};

/// One measured figure, as a JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Its id and name (`W1 lenet_bn_train`, ...).
    pub workload: String,
    /// The backend (`--device`).
    pub device: String,
    /// Rayon's worker threads.
    pub threads: usize,
    /// The batch norm that ran, where the workload has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub norm: Option<String>,
    /// Throughput of the training and inference workloads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub examples_per_sec: Option<f64>,
    /// W6: the mean time of one forward and backward pass, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms_per_fwd_bwd: Option<f64>,
    /// W6: the median time of one forward and backward pass, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ms_per_fwd_bwd_median: Option<f64>,
    /// W6: the layer's least memory traffic (x read forward; x and dy read backward; y and dx
    /// written: five tensors) over its median time, in GB/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gb_per_sec: Option<f64>,
    /// W6: the rate of a plain copy of a tensor of the same size on all threads, from memory
    /// (the caches swept before each copy, as W6's tensors, four times the last-level cache,
    /// come from memory): bytes read plus bytes written over the median of as many copies as
    /// W6 has iterations, measured in the same process, in GB/s. What `gb_per_sec` is set
    /// against.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_gb_per_sec: Option<f64>,
    /// W6: the same copy repeated back to back, its source and destination left in cache (the
    /// best of as many copies): the figure `copy_gb_per_sec` was before 2026-12-03, kept for
    /// the record. On a machine whose last-level cache holds much of the tensor it measures
    /// the cache, not memory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_in_cache_gb_per_sec: Option<f64>,
    /// RSS: the peak resident memory, in MB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_mb: Option<f64>,
    /// W0: the matrix product's rate; W4, W5: the convolutions' matrix products' floating-point
    /// operations over the training steps' whole time, in GFLOP/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gflops: Option<f64>,
    /// W4, W5: `gflops` as a share of W0's (measured in the same process).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share_of_peak: Option<f64>,
    /// W1: the test accuracy after the epoch (a check that the run learned).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test_acc: Option<f64>,
    /// W7: whether eval-mode BN was folded into the layer before it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub folded: Option<bool>,
    /// Wall time of the whole measurement.
    pub seconds: f64,
    /// What was run, in words (sizes shrink with --quick).
    pub detail: String,
}

impl Record {
    /// A record of `workload` on the selected device, with only the time filled in.
    pub fn new(workload: &str, seconds: f64, detail: String) -> Self {
        Self {
            workload: workload.into(),
            device: crate::device::selected().to_string(),
            threads: rayon::current_num_threads(),
            norm: None,
            examples_per_sec: None,
            ms_per_fwd_bwd: None,
            ms_per_fwd_bwd_median: None,
            gb_per_sec: None,
            copy_gb_per_sec: None,
            copy_in_cache_gb_per_sec: None,
            peak_rss_mb: None,
            gflops: None,
            share_of_peak: None,
            test_acc: None,
            folded: None,
            seconds,
            detail,
        }
    }
}

/// Sizes of the workloads: the real ones, or small ones that only check the plumbing.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// W1: training batches of the epoch (`None`: all of them).
    pub lenet_batches: Option<usize>,
    /// W4: timed ResNet-18 training steps.
    pub resnet_steps: usize,
    /// W5: timed DenseNet training steps.
    pub densenet_steps: usize,
    /// W8: timed DenseNet training steps at its large batch.
    pub densenet_large_steps: usize,
    /// W8: that batch (the recipe's 256; small under `--quick`).
    pub densenet_large_batch: usize,
    /// W6: timed forward and backward passes.
    pub bn_iters: usize,
    /// W0: the side of the square matrices.
    pub matmul_side: usize,
    /// W0: timed products.
    pub matmul_reps: usize,
    /// W7: test batches (`None`: the whole test set).
    pub inference_batches: Option<usize>,
}

impl Scale {
    /// The sizes the published figures use.
    pub fn full() -> Self {
        Self {
            lenet_batches: None,
            resnet_steps: 30,
            densenet_steps: 10,
            densenet_large_steps: 4,
            densenet_large_batch: 256,
            bn_iters: 50,
            matmul_side: 1024,
            matmul_reps: 5,
            inference_batches: None,
        }
    }

    /// A few steps of each (`--quick`): checks that every workload runs, measures nothing.
    pub fn quick() -> Self {
        Self {
            lenet_batches: Some(3),
            resnet_steps: 2,
            densenet_steps: 1,
            densenet_large_steps: 1,
            densenet_large_batch: 8,
            bn_iters: 3,
            matmul_side: 64,
            matmul_reps: 1,
            inference_batches: Some(2),
        }
    }
}

/// The norms a workload is run with.
pub const NORMS: [NormKind; 3] = [NormKind::Fused, NormKind::Scratch, NormKind::Burn];

/// `--norm`'s name, and what runs instead where the fused kernel has no kernel for the backend.
fn norm_label(norm: NormKind) -> String {
    let name = norm.to_string();
    match norm == NormKind::Fused && !crate::ops::batch_norm::supports(&train_device()) {
        true => format!("{name} (scratch: no fused kernel on this backend)"),
        false => name,
    }
}

/// W1: one epoch of LeNet-BN training with `norm`.
pub fn lenet_training(data: &FashionMnist, norm: NormKind, scale: Scale) -> anyhow::Result<Record> {
    let config = RunConfig {
        norm: Some(norm.into()),
        epochs: 1,
        limit_batches: scale.lenet_batches,
        ..Default::default()
    };
    let started = Instant::now();
    let out = train::train(&config, data, &mut Quiet)?;
    let m = &out.metrics[0];
    let mut r = Record::new(
        "W1 lenet_bn_train",
        started.elapsed().as_secs_f64(),
        format!(
            "LeNet-BN, SGD lr 1.0, batch 256, {} batches",
            scale.lenet_batches.map_or("235".into(), |b| b.to_string())
        ),
    );
    r.norm = Some(norm_label(norm));
    r.examples_per_sec = Some(m.examples_per_sec);
    r.test_acc = m.test_acc;
    Ok(r)
}

/// A training workload on fixed in-memory batches, timed after warm-up, as torch_bench.py's
/// `run_steps`: W4 and W5.
#[derive(Clone, Copy)]
struct StepsWorkload {
    name: &'static str,
    model: ModelKind,
    batch: usize,
    size: usize,
    warmup: usize,
}

/// W4: ResNet-18 on 28 × 28 images, batch 128, 30 steps after 3.
const W4: StepsWorkload = StepsWorkload {
    name: "W4 resnet18_28px",
    model: ModelKind::Resnet18,
    batch: 128,
    size: 28,
    warmup: 3,
};

/// W5: DenseNet on images resized to 96 × 96, batch 64, 10 steps after 2.
const W5: StepsWorkload = StepsWorkload {
    name: "W5 densenet_96px",
    model: ModelKind::Densenet,
    batch: 64,
    size: 96,
    warmup: 2,
};

/// W8: W5 at the `densenet` recipe's batch of 256, 4 steps after 1: whether the large batch
/// trains as fast per example as W5's 64, and the peak memory the recipe's steps reach.
const W8: StepsWorkload = StepsWorkload {
    name: "W8 densenet_96px_batch256",
    model: ModelKind::Densenet,
    batch: 256,
    size: 96,
    warmup: 1,
};

/// W0: the rate of the best matrix product this CPU runs here, the reference for W4's and W5's
/// GFLOP/s: the `gemm` crate (the convolutions' own, with its AVX-512 kernels where the CPU
/// has them) on float32 `n × n` by `n × n` with all of rayon's threads, the best of `reps`
/// after one warm-up. `n` = 1024 unless `--quick`.
pub fn matmul_peak(scale: Scale) -> Record {
    let n = scale.matmul_side;
    let a: Vec<f32> = (0..n * n).map(|i| (i % 7) as f32 * 0.25 - 0.75).collect();
    let b: Vec<f32> = (0..n * n).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
    let mut c = vec![0.0f32; n * n];
    let threads = rayon::current_num_threads();
    let mut product = || {
        let started = Instant::now();
        // SAFETY: a, b and c are n × n row-major, as the strides say.
        unsafe {
            gemm::gemm(
                n,
                n,
                n,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                n as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            )
        };
        started.elapsed().as_secs_f64()
    };
    product();
    let best = (0..scale.matmul_reps)
        .map(|_| product())
        .fold(f64::INFINITY, f64::min);
    let mut r = Record::new(
        "W0 matmul_peak",
        best,
        format!("gemm f32 {n}x{n}x{n}, best of {}", scale.matmul_reps),
    );
    r.gflops = Some(2.0 * (n * n * n) as f64 / best / 1e9);
    r
}

/// W4: ResNet-18 training steps on fixed in-memory batches, after warm-up.
pub fn resnet_training(
    data: &FashionMnist,
    norm: NormKind,
    scale: Scale,
) -> anyhow::Result<Record> {
    steps_training(data, &W4, norm, scale.resnet_steps)
}

/// W5: DenseNet training steps at 96 × 96, after warm-up, with the peak RSS they reach.
pub fn densenet_training(
    data: &FashionMnist,
    norm: NormKind,
    scale: Scale,
) -> anyhow::Result<Record> {
    reset_peak_rss();
    let mut r = steps_training(data, &W5, norm, scale.densenet_steps)?;
    r.peak_rss_mb = peak_rss_mb();
    Ok(r)
}

/// W8: W5's steps at the recipe's batch of 256, with the peak RSS they reach.
pub fn densenet_large_batch_training(
    data: &FashionMnist,
    norm: NormKind,
    scale: Scale,
) -> anyhow::Result<Record> {
    reset_peak_rss();
    let w = StepsWorkload {
        batch: scale.densenet_large_batch,
        ..W8
    };
    let mut r = steps_training(data, &w, norm, scale.densenet_large_steps)?;
    r.peak_rss_mb = peak_rss_mb();
    Ok(r)
}

/// Adam 1e-3 steps of `w`'s model, the images resized once before the clock starts.
fn steps_training(
    data: &FashionMnist,
    w: &StepsWorkload,
    norm: NormKind,
    steps: usize,
) -> anyhow::Result<Record> {
    let config = RunConfig {
        model: w.model,
        norm: Some(norm.into()),
        optimizer: OptimizerKind::Adam,
        lr: 1e-3,
        batch_size: w.batch,
        resize: (w.size != 28).then_some(w.size),
        ..Default::default()
    };
    config.validate()?;
    let device = train_device();
    let mut model = config.model_spec().init(0, &device);
    let mut optim = train::optim::optimizer(&config);
    let loss_fn = CrossEntropyLossConfig::new().init(&device);
    let batches: Vec<_> = (0..w.warmup + steps)
        .map(|b| {
            let indices: Vec<usize> = (b * w.batch..(b + 1) * w.batch).collect();
            input_batch(&data.train, &indices, w.size, &device)
        })
        .collect();
    let mut step = |model: Model, (x, y): &(Tensor<4>, Tensor<1, burn::tensor::Int>)| {
        let loss = loss_fn.forward(model.forward(x.clone()), y.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        optim.step(1e-3, model, grads)
    };
    for batch in &batches[..w.warmup] {
        model = step(model, batch);
    }
    let flops_before = crate::ops::conv2d::product_flops();
    let started = Instant::now();
    for batch in &batches[w.warmup..] {
        model = step(model, batch);
    }
    let seconds = started.elapsed().as_secs_f64();
    let flops = crate::ops::conv2d::product_flops() - flops_before;
    let mut r = Record::new(
        w.name,
        seconds,
        format!(
            "{}, 1x{size}x{size}, batch {}, Adam 1e-3, {steps} steps after {}",
            w.model,
            w.batch,
            w.warmup,
            size = w.size
        ),
    );
    r.norm = Some(norm_label(norm));
    r.examples_per_sec = Some((w.batch * steps) as f64 / seconds);
    r.gflops = (flops > 0).then(|| flops as f64 / seconds / 1e9);
    Ok(r)
}

/// Starts this process's peak-RSS count afresh (Linux: `clear_refs` 5), so that a workload's
/// peak is its own; elsewhere the peak stays the process's. Before spawning a process whose
/// peak is measured too: Linux counts the peak of the image a child replaces at `exec` (a copy
/// of this process's, peak included) in the child's `ru_maxrss`.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// This process's peak RSS since [`reset_peak_rss`] (`VmHWM`), in MB.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// W6: one BatchNorm2d(64) layer, forward and backward, on (128, 64, 28, 28).
pub fn bn_layer(norm: NormKind, scale: Scale) -> Record {
    let device = train_device();
    let layer = NormLayer::new(&NormConfig::of(norm), 64, &device).expect("a BN kind");
    let shape = [128, 64, 28, 28];
    let x = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device).require_grad();
    let g = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let iterate = || {
        let y = layer.forward(x.clone());
        // The upstream gradient goes straight in, as in torch_bench.py's
        // `autograd.grad(y, params, g)`; off Flex, through `(y * g).sum()`.
        let grads = crate::ops::seeded_backward::backward_with(y.clone(), g.clone())
            .unwrap_or_else(|| (y * g.clone()).sum().backward());
        // Read the gradients so that nothing is left lazily unevaluated.
        let dx = x.grad(&grads).expect("dx");
        dx.slice([0..1, 0..1, 0..1, 0..1]).into_scalar::<f32>()
    };
    for _ in 0..5.min(scale.bn_iters) {
        iterate();
    }
    let mut times = Vec::with_capacity(scale.bn_iters);
    let started = Instant::now();
    for _ in 0..scale.bn_iters {
        let t = Instant::now();
        iterate();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let seconds = started.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let mut r = Record::new(
        "W6 bn2d_layer",
        seconds,
        format!(
            "BatchNorm2d(64) fwd+bwd on {shape:?} f32, {} iterations",
            scale.bn_iters
        ),
    );
    r.norm = Some(norm_label(norm));
    let mean = seconds / scale.bn_iters as f64;
    r.ms_per_fwd_bwd = Some(mean * 1e3);
    let median = times[times.len() / 2];
    r.ms_per_fwd_bwd_median = Some(median);
    let tensor_bytes = (shape.iter().product::<usize>() * std::mem::size_of::<f32>()) as f64;
    r.gb_per_sec = Some(5.0 * tensor_bytes / (median / 1e3) / 1e9);
    let copy = copy_rates(shape.iter().product(), scale.bn_iters);
    r.copy_gb_per_sec = Some(copy.from_memory);
    r.copy_in_cache_gb_per_sec = Some(copy.in_cache);
    r
}

/// The rates of a plain copy, in GB/s (bytes read plus bytes written).
pub struct CopyRates {
    /// The median of copies that each start with the caches swept.
    pub from_memory: f64,
    /// The best of copies run back to back.
    pub in_cache: f64,
}

/// The rates of a plain copy of `len` float32 values, split over rayon's threads (each copies
/// its contiguous share with `copy_from_slice`, the C library's `memcpy`), over `reps` copies
/// after one that also faults the pages in: from memory, each copy after a read of a buffer
/// twice the last-level cache, which evicts the copy's source and destination; and in cache,
/// copies back to back.
pub fn copy_rates(len: usize, reps: usize) -> CopyRates {
    use rayon::prelude::*;
    let from: Vec<f32> = (0..len).map(|i| (i % 251) as f32).collect();
    let mut to = vec![0.0f32; len];
    let share = len.div_ceil(rayon::current_num_threads()).max(1);
    let mut copy = || {
        let started = Instant::now();
        to.par_chunks_mut(share)
            .zip(from.par_chunks(share))
            .for_each(|(to, from)| to.copy_from_slice(from));
        started.elapsed().as_secs_f64()
    };
    copy();
    let reps = reps.max(1);
    let in_cache = (0..reps).map(|_| copy()).fold(f64::INFINITY, f64::min);
    let sweep = vec![1u8; 2 * crate::ops::cpu::last_level_cache_bytes()];
    let mut from_memory: Vec<f64> = (0..reps)
        .map(|_| {
            // One byte of each 64-byte line: the read brings every line of the sweep in.
            let touched: u64 = sweep.iter().step_by(64).map(|&b| b as u64).sum();
            std::hint::black_box(touched);
            copy()
        })
        .collect();
    std::hint::black_box(&to);
    from_memory.sort_by(f64::total_cmp);
    let rate = |seconds: f64| 2.0 * (len * std::mem::size_of::<f32>()) as f64 / seconds / 1e9;
    CopyRates {
        from_memory: rate(from_memory[from_memory.len() / 2]),
        in_cache: rate(in_cache),
    }
}

/// W7: eval-mode inference over the test set.
pub fn inference(data: &FashionMnist, kind: ModelKind, folded: bool, scale: Scale) -> Record {
    let model = ModelSpec::of(kind, NormKind::Scratch).init(0, &eval_device());
    let model = if folded {
        crate::models::fold_bn(model)
    } else {
        model
    };
    let batch = 256;
    let n = scale
        .inference_batches
        .map_or(data.test.len(), |b| (b * batch).min(data.test.len()));
    let order: Vec<usize> = (0..n).collect();
    let started = Instant::now();
    for indices in order.chunks(batch) {
        let (x, _) = input_batch(&data.test, indices, 28, &eval_device());
        let logits = model.forward(x);
        let _ = logits.argmax(1).into_data();
    }
    let seconds = started.elapsed().as_secs_f64();
    let mut r = Record::new(
        &format!("W7 inference_{}", kind),
        seconds,
        format!("{n} test images, batch {batch}, eval mode"),
    );
    r.examples_per_sec = Some(n as f64 / seconds);
    r.folded = Some(folded);
    r
}

/// Peak resident memory of the children this process has waited for, in MB.
pub fn children_peak_rss_mb() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a rusage into the pointer it is given.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr());
        usage.assume_init()
    };
    usage.ru_maxrss as f64 / 1024.0 // Linux reports kilobytes
}
