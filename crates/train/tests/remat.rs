//! Activation recomputation (`longview_train::remat`) against plain autodiff of the
//! model's own loss (`Vlm::loss`), on the debug VLM with frames on the CPU: the loss
//! and the gradient of every parameter, for every mode, with a tied and an untied LM
//! head and with a frozen vision tower and LLM (stage 1: only the projector trains).

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use longview_models::vila::{IGNORE_INDEX, VisualInput, VlmConfig, default_position_ids};
use longview_models::{Vlm, VlmInput};
use longview_train::remat::{Recompute, loss_and_grads};

const ANSWER: usize = 4;

/// A parameter's index, shape, and its gradient in the result and in the reference.
type Pair = (usize, Vec<usize>, Vec<f32>, Vec<f32>);

/// Two samples: 3 text tokens, 2 frames of 9 placeholders + a separator, 4 answer
/// tokens. One label sits on a placeholder (the model must ignore it).
fn batch(config: &VlmConfig, device: &Device) -> (VlmInput, Tensor<2, Int>, usize) {
    let placeholder = config.placeholder_token_id as i64;
    let per_frame = config.tokens_per_frame();
    let (batch, frames) = (2, 2);
    let (mut ids, mut labels) = (Vec::new(), Vec::new());
    let mut seq = 0;
    for b in 0..batch as i64 {
        let mut row: Vec<i64> = (0..3).map(|i| 10 + 7 * i + b).collect();
        for _ in 0..frames {
            row.extend(std::iter::repeat_n(placeholder, per_frame));
            row.push(298);
        }
        let prompt = row.len();
        row.extend((0..ANSWER as i64).map(|i| 40 + 13 * i + 5 * b));
        let mut row_labels = vec![IGNORE_INDEX; prompt];
        row_labels[5] = 123; // a placeholder position
        row_labels.extend_from_slice(&row[prompt..]);
        seq = row.len();
        ids.extend(row);
        labels.extend(row_labels);
    }
    let side = config.vision.image_size;
    let pixels = Tensor::<4>::random(
        [batch * frames, 3, side, side],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let input = VlmInput {
        input_ids: Tensor::from_data(TensorData::new(ids, [batch, seq]), device),
        position_ids: default_position_ids(batch, seq, device),
        visual: VisualInput::Pixels(pixels),
    };
    let labels = Tensor::from_data(TensorData::new(labels, [batch, seq]), device);
    (input, labels, batch * ANSWER)
}

fn clone_input(input: &VlmInput) -> VlmInput {
    VlmInput {
        input_ids: input.input_ids.clone(),
        position_ids: input.position_ids.clone(),
        visual: match &input.visual {
            VisualInput::Pixels(p) => VisualInput::Pixels(p.clone()),
            VisualInput::Embeddings(e) => VisualInput::Embeddings(e.clone()),
            VisualInput::None => VisualInput::None,
        },
    }
}

/// Every parameter's gradient in `got` against `want`: both absent, or the largest
/// |difference| within `1e-4` of max(largest |want| of the parameter, 1e-3 x the
/// largest |want| of the model). The floor covers gradients that are zero in exact
/// arithmetic (key biases: softmax ignores a constant shift), where both sides hold
/// rounding noise only. Returns how many were compared.
fn compare(model: &Vlm, got: &GradientsParams, want: &GradientsParams, what: &str) -> usize {
    struct Collect<'a> {
        got: &'a GradientsParams,
        want: &'a GradientsParams,
        pairs: Vec<Pair>,
        index: usize,
        one_sided: Vec<(usize, bool)>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let index = self.index;
            self.index += 1;
            match (self.got.get::<D>(param.id), self.want.get::<D>(param.id)) {
                (None, None) => {}
                (Some(got), Some(want)) => self.pairs.push((
                    index,
                    param.shape().to_vec(),
                    got.into_data().iter::<f32>().collect(),
                    want.into_data().iter::<f32>().collect(),
                )),
                (got, _) => self.one_sided.push((index, got.is_some())),
            }
        }
    }
    let mut collect = Collect {
        got,
        want,
        pairs: Vec::new(),
        index: 0,
        one_sided: Vec::new(),
    };
    model.visit(&mut collect);
    assert!(
        collect.one_sided.is_empty(),
        "{what}: gradients on one side only (parameter index, present in the result): {:?}",
        collect.one_sided
    );
    let largest = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let global = collect
        .pairs
        .iter()
        .fold(0f32, |m, (_, _, _, want)| m.max(largest(want)));
    assert!(global > 0.0, "{what}: every reference gradient is zero");
    for (index, shape, got, want) in &collect.pairs {
        let scale = largest(want).max(1e-3 * global);
        let error = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs() / scale)
            .fold(0f32, f32::max);
        // f32 on the CPU; only summation orders differ.
        assert!(
            error <= 1e-4,
            "{what}: parameter #{index} {shape:?}: relative error {error:.2e} (scale {scale:.2e})"
        );
    }
    collect.pairs.len()
}

/// Runs every mode on `model` and checks it against `Vlm::loss` + autodiff; returns
/// the number of parameters with a gradient.
fn check_modes(model: &Vlm, config: &VlmConfig, device: &Device, what: &str) -> usize {
    let (input, labels, supervised) = batch(config, device);
    check_modes_on(model, input, labels, supervised, what)
}

fn check_modes_on(
    model: &Vlm,
    input: VlmInput,
    labels: Tensor<2, Int>,
    supervised: usize,
    what: &str,
) -> usize {
    let loss = model.loss(clone_input(&input), labels.clone()).unwrap();
    let want_loss = loss.clone().into_scalar::<f32>();
    let want = GradientsParams::from_grads(loss.backward(), model);
    let mut compared = 0;
    for mode in [
        Recompute::None,
        Recompute::Layers,
        Recompute::AttentionAware,
    ] {
        let (got_loss, got) = loss_and_grads(
            model,
            clone_input(&input),
            labels.clone(),
            supervised as f32,
            mode,
        )
        .unwrap();
        assert!(
            (got_loss - want_loss).abs() <= 1e-5 * want_loss.abs().max(1.0),
            "{what}, {mode}: loss {got_loss} vs {want_loss}"
        );
        compared = compare(model, &got, &want, &format!("{what}, {mode}"));
    }
    compared
}

/// Float parameters of a module.
fn count<M: Module>(module: &M) -> usize {
    struct Count(usize);
    impl ModuleVisitor for Count {
        fn visit_float<const D: usize>(&mut self, _: &Param<Tensor<D>>) {
            self.0 += 1;
        }
    }
    let mut count = Count(0);
    module.visit(&mut count);
    count.0
}

#[test]
fn every_mode_gives_the_gradients_of_plain_autodiff() {
    let device = Device::flex().autodiff();
    let config = VlmConfig::debug();
    let model = config.init(&device);
    let compared = check_modes(&model, &config, &device, "untied head");
    let total = count(&model);
    // Every parameter that takes part gets a gradient: all but the vision layers after
    // the selected feature layer and the post-layernorm (layer -2 of the tower).
    let unused = {
        let tower = &model.vision_tower;
        let run = tower.layers_to_run(model.vision_feature);
        count(&tower.encoder.layers[run..].to_vec()) + count(&tower.post_layernorm)
    };
    assert!(unused > 0);
    assert_eq!(compared, total - unused);
}

#[test]
fn a_tied_head_sums_its_two_gradients() {
    let device = Device::flex().autodiff();
    let mut config = VlmConfig::debug();
    config.text.tie_word_embeddings = true;
    let model = config.init(&device);
    assert!(model.llm.lm_head.is_none());
    check_modes(&model, &config, &device, "tied head");
}

#[test]
fn frozen_parts_get_no_gradient_but_pass_it_through() {
    let device = Device::flex().autodiff();
    let config = VlmConfig::debug();
    let mut model = config.init(&device);
    model.vision_tower = model.vision_tower.no_grad();
    model.llm = model.llm.no_grad();
    let compared = check_modes(&model, &config, &device, "projector only");
    assert_eq!(compared, count(&model.mm_projector));
}

#[test]
fn given_visual_embeddings_are_constants_of_the_step() {
    // Cached embeddings (LongVILA-R1 reuses them across rollouts): the vision tower
    // and projector do not run and get no gradient.
    let device = Device::flex().autodiff();
    let config = VlmConfig::debug();
    let model = config.init(&device);
    let (mut input, labels, supervised) = batch(&config, &device);
    let frames = match &input.visual {
        VisualInput::Pixels(p) => p.dims()[0],
        _ => unreachable!(),
    };
    input.visual = VisualInput::Embeddings(Tensor::random(
        [frames, config.tokens_per_frame(), config.text.hidden_size],
        Distribution::Normal(0.0, 1.0),
        &device,
    ));
    let compared = check_modes_on(&model, input, labels, supervised, "given embeddings");
    assert_eq!(compared, count(&model.llm));
}

#[test]
fn recompute_names_parse_and_print() {
    for mode in [
        Recompute::None,
        Recompute::Layers,
        Recompute::AttentionAware,
    ] {
        assert_eq!(mode.to_string().parse::<Recompute>(), Ok(mode));
    }
    let error = "full".parse::<Recompute>().unwrap_err();
    assert!(error.contains("none, layers, attention-aware"), "{error}");
}
