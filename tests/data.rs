//! The IDX reader on the real Fashion-MNIST files (Debian's dataset-fashion-mnist), and on
//! damaged copies of them.

use std::io::Write;
use std::path::{Path, PathBuf};

use bnlab::data::{DataError, FashionMnist, CLASS_NAMES, DEFAULT_DATA_DIR};
use burn::tensor::Device;

const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

fn real_dir() -> &'static Path {
    let dir = Path::new(DEFAULT_DATA_DIR);
    assert!(
        dir.join("train-images-idx3-ubyte.gz").is_file(),
        "the tests need the real data: apt-get install dataset-fashion-mnist"
    );
    dir
}

#[test]
fn loads_the_real_dataset() {
    let data = FashionMnist::load(real_dir()).unwrap();
    assert_eq!((data.train.len(), data.test.len()), (60_000, 10_000));
    assert_eq!((data.train.rows, data.train.cols), (28, 28));
    assert_eq!(data.train.images.len(), 60_000 * 784);
    // Fashion-MNIST is balanced: 6000 training and 1000 test images per class.
    for (split, per_class) in [(&data.train, 6000), (&data.test, 1000)] {
        let mut counts = [0usize; 10];
        split.labels.iter().for_each(|&l| counts[l as usize] += 1);
        assert_eq!(counts, [per_class; 10]);
    }
    // The first training image is an ankle boot, the first test image too.
    assert_eq!(CLASS_NAMES[data.train.labels[0] as usize], "ankle boot");
    assert_eq!(CLASS_NAMES[data.test.labels[0] as usize], "ankle boot");
}

#[test]
fn batches_are_scaled_to_unit_range() {
    let data = FashionMnist::load(real_dir()).unwrap();
    let (images, labels) = data.test.batch(&[0, 1, 2], &Device::flex());
    assert_eq!(images.dims(), [3, 1, 28, 28]);
    let pixels: Vec<f32> = images.into_data().iter::<f32>().collect();
    assert!(pixels.iter().all(|p| (0.0..=1.0).contains(p)));
    assert_eq!(
        pixels.iter().cloned().fold(0.0, f32::max),
        1.0,
        "some pixel is white"
    );
    let labels: Vec<i64> = labels.into_data().iter::<i64>().collect();
    assert_eq!(
        labels,
        data.test.labels[..3]
            .iter()
            .map(|&l| l as i64)
            .collect::<Vec<_>>()
    );
}

/// A copy of the real files in a temporary directory, decompressed when `plain`.
fn copy_of_real(plain: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in FILES {
        let gz = std::fs::read(real_dir().join(format!("{name}.gz"))).unwrap();
        if plain {
            let mut raw = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut raw)
                .unwrap();
            std::fs::write(dir.path().join(name), raw).unwrap();
        } else {
            std::fs::write(dir.path().join(format!("{name}.gz")), gz).unwrap();
        }
    }
    dir
}

fn gz(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.gz"))
}

fn load_error(dir: &Path) -> String {
    let err: DataError = FashionMnist::load(dir).expect_err("damaged data must not load");
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "one line: {msg}");
    // The files were looked for in a directory of the user's: the fix is theirs, not the
    // package's.
    assert!(
        msg.contains(&format!(
            "put the Fashion-MNIST files in --data {}",
            dir.display()
        )),
        "{msg}"
    );
    msg
}

#[test]
fn plain_files_load_like_gzip_files() {
    let dir = copy_of_real(true);
    let plain = FashionMnist::load(dir.path()).unwrap();
    let gz = FashionMnist::load(real_dir()).unwrap();
    assert_eq!(plain.test.images, gz.test.images);
    assert_eq!(plain.train.labels, gz.train.labels);
}

#[test]
fn a_missing_file_is_named() {
    let dir = copy_of_real(false);
    std::fs::remove_file(gz(dir.path(), "t10k-labels-idx1-ubyte")).unwrap();
    let msg = load_error(dir.path());
    assert!(
        msg.contains("t10k-labels-idx1-ubyte.gz: not found"),
        "{msg}"
    );
    let msg = load_error(Path::new("/nonexistent/fashion"));
    assert!(
        msg.contains("/nonexistent/fashion/train-images-idx3-ubyte.gz"),
        "{msg}"
    );
}

#[test]
fn a_truncated_gzip_file_is_named() {
    let dir = copy_of_real(false);
    let path = gz(dir.path(), "train-images-idx3-ubyte");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let msg = load_error(dir.path());
    assert!(
        msg.contains("train-images-idx3-ubyte.gz: corrupt or truncated gzip"),
        "{msg}"
    );
}

#[test]
fn corrupt_gzip_data_is_named() {
    let dir = copy_of_real(false);
    let path = gz(dir.path(), "t10k-images-idx3-ubyte");
    let mut bytes = std::fs::read(&path).unwrap();
    for b in &mut bytes[100..200] {
        *b ^= 0x5a;
    }
    std::fs::write(&path, bytes).unwrap();
    let msg = load_error(dir.path());
    assert!(
        msg.contains("t10k-images-idx3-ubyte.gz: corrupt or truncated gzip"),
        "{msg}"
    );
}

#[test]
fn a_truncated_plain_file_is_named() {
    let dir = copy_of_real(true);
    let path = dir.path().join("t10k-images-idx3-ubyte");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 784]).unwrap();
    let msg = load_error(dir.path());
    assert!(msg.contains("t10k-images-idx3-ubyte: truncated"), "{msg}");
}

#[test]
fn a_wrong_magic_number_is_named() {
    let dir = copy_of_real(true);
    let path = dir.path().join("train-labels-idx1-ubyte");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[3] = 3; // labels claiming to be 3-dimensional
    std::fs::write(&path, bytes).unwrap();
    let msg = load_error(dir.path());
    assert!(
        msg.contains("train-labels-idx1-ubyte: IDX file has 3 dimensions, expected 1"),
        "{msg}"
    );
}

#[test]
fn image_and_label_counts_must_agree() {
    let dir = copy_of_real(true);
    // Swap in the test labels for the training labels: 10000 labels for 60000 images.
    std::fs::copy(
        dir.path().join("t10k-labels-idx1-ubyte"),
        dir.path().join("train-labels-idx1-ubyte"),
    )
    .unwrap();
    let msg = load_error(dir.path());
    assert!(
        msg.contains("train-labels-idx1-ubyte: 10000 labels for 60000 images"),
        "{msg}"
    );
}

#[test]
fn labels_outside_the_ten_classes_are_named() {
    let dir = copy_of_real(true);
    let path = dir.path().join("t10k-labels-idx1-ubyte");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8 + 42] = 10;
    std::fs::write(&path, bytes).unwrap();
    let msg = load_error(dir.path());
    assert!(
        msg.contains("label 10 at index 42 is not a class 0-9"),
        "{msg}"
    );
}

#[test]
fn images_must_be_28_by_28() {
    let dir = copy_of_real(true);
    let path = dir.path().join("t10k-images-idx3-ubyte");
    let bytes = std::fs::read(&path).unwrap();
    // Re-declare 10000 images of 28x28 as 20000 of 14x28: the byte count still agrees.
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&[0, 0, 8, 3]).unwrap();
    for d in [20000u32, 14, 28] {
        f.write_all(&d.to_be_bytes()).unwrap();
    }
    f.write_all(&bytes[16..]).unwrap();
    drop(f);
    let msg = load_error(dir.path());
    assert!(msg.contains("images are 14x28, expected 28x28"), "{msg}");
}

/// `bytes` gzip-compressed as one member.
fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// pigz, bgzip and `cat a.gz b.gz` write several gzip members; together they are one file.
#[test]
fn multi_member_gzip_files_load() {
    let dir = copy_of_real(false);
    for name in ["t10k-labels-idx1-ubyte", "t10k-images-idx3-ubyte"] {
        let path = gz(dir.path(), name);
        let mut raw = Vec::new();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(&std::fs::read(&path).unwrap()[..]),
            &mut raw,
        )
        .unwrap();
        // Three members, the first cut inside the header.
        let cuts = [0, 6, raw.len() / 2, raw.len()];
        let members: Vec<u8> = cuts
            .windows(2)
            .flat_map(|w| gzip(&raw[w[0]..w[1]]))
            .collect();
        std::fs::write(&path, members).unwrap();
    }
    let split = FashionMnist::load(dir.path()).unwrap();
    let real = FashionMnist::load(real_dir()).unwrap();
    assert_eq!(split.test.labels, real.test.labels);
    assert_eq!(split.test.images, real.test.images);
}

/// A header promising one 28x28 image, then 200 MB of zeros that gzip shrinks to a few
/// hundred kilobytes: bnlab stops reading one byte past the promise, so it fails at once with
/// its memory bounded (the whole stream used to be decompressed into memory first).
#[test]
fn a_gzip_bomb_is_refused_with_memory_bounded() {
    let dir = copy_of_real(false);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&[0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 28, 0, 0, 0, 28])
        .unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..200 {
        gz.write_all(&zeros).unwrap();
    }
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    std::fs::write(gz_path(dir.path()), bomb).unwrap();

    let out = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let result = std::process::Command::new(env!("CARGO_BIN_EXE_bnlab"))
        .args(["train", "--epochs", "1", "--limit-batches", "1", "--data"])
        .arg(dir.path())
        .arg("--out")
        .arg(out.path().join("run"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success());
    assert!(
        stderr.contains("train-images-idx3-ubyte.gz: trailing bytes"),
        "{stderr}"
    );
    assert!(started.elapsed().as_secs() < 5, "{:?}", started.elapsed());
    // The only child this test binary waits for: its peak resident memory, in kilobytes.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) },
        0
    );
    let peak_mb = usage.ru_maxrss / 1024;
    assert!(peak_mb < 100, "bnlab peaked at {peak_mb} MB");
}

fn gz_path(dir: &Path) -> PathBuf {
    gz(dir, "train-images-idx3-ubyte")
}
