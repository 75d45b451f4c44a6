//! Still-image preprocessing against what PIL (Hugging Face's SigLIP processor path)
//! makes of the same files: tests/fixtures/make_image_fixtures.py.

use std::path::PathBuf;

use longview_data::{DataError, Normalization, Preprocess, load_image};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/image")
}

#[derive(serde::Deserialize)]
struct Reference {
    size: [u32; 2],
    images: std::collections::BTreeMap<String, Vec<f64>>,
}

#[test]
fn images_match_pil_bicubic_preprocessing() {
    let reference: Reference =
        serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json")).unwrap())
            .unwrap();
    let pre = Preprocess {
        width: reference.size[0],
        height: reference.size[1],
        norm: Normalization::SIGLIP,
    };
    for (name, expected) in &reference.images {
        let ours = load_image(dir().join(name), &pre).unwrap();
        assert_eq!(ours.len(), expected.len(), "{name}");
        let diffs: Vec<f64> = ours
            .iter()
            .zip(expected)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .collect();
        let max = diffs.iter().cloned().fold(0.0, f64::max);
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        eprintln!(
            "{name}: max |diff| {max:.4}, mean {mean:.5} (normalised units; one 8-bit level = 2/255 = 0.0078)"
        );
        // Values are in [-1, 1], one 8-bit level is 2/255. PIL rounds to 8 bits
        // between its two resampling passes and the JPEG decoders differ (libjpeg-turbo
        // vs zune-jpeg): allow 2 levels anywhere (measured: 1, and 2 for the rotated
        // JPEG) and half a level on average (measured: at most 0.45).
        assert!(max <= 2.0 * 2.0 / 255.0 + 1e-6, "{name}: max diff {max}");
        assert!(mean <= 0.5 * 2.0 / 255.0, "{name}: mean diff {mean}");
    }
}

#[test]
fn bad_images_give_clear_errors() {
    let pre = Preprocess::SIGLIP_384;
    let err = load_image("/nonexistent/cat.png", &pre).unwrap_err();
    assert!(
        matches!(err, DataError::NotFound { .. }) && err.to_string().contains("cat.png"),
        "{err}"
    );
    let tmp = std::env::temp_dir().join(format!("longview-image-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let text = tmp.join("notes.png");
    std::fs::write(&text, "not an image at all").unwrap();
    let err = load_image(&text, &pre).unwrap_err();
    assert!(
        matches!(err, DataError::Image { .. }) && err.to_string().contains("notes.png"),
        "{err}"
    );
    let png = std::fs::read(dir().join("pattern.png")).unwrap();
    let cut = tmp.join("cut.png");
    std::fs::write(&cut, &png[..png.len() / 2]).unwrap();
    let err = load_image(&cut, &pre).unwrap_err();
    assert!(
        matches!(err, DataError::Image { .. }) && err.to_string().contains("cut.png"),
        "{err}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}
