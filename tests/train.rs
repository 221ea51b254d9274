//! Training-level guarantees: determinism, exact resume, checkpoint round trip, overfitting,
//! routed share during training, and the bad inputs the library must refuse cleanly.

use candle_core::{Device, Tensor};
use itt::base::config::{self, RunConfig};
use itt::checkpoint;
use itt::data::{self, synthetic, Tokenizer};
use itt::model::{Model, RoutingOptions, SeqLayout};
use itt::train::{self, RunOptions, Trainer, TrainerOptions};
use std::path::Path;

fn small_run(preset: &str, tok: &Tokenizer, steps: usize) -> RunConfig {
    let mut cfg = config::preset(preset).unwrap();
    cfg.model =
        config::TestModel::preset(preset).vocab(tok.vocab_size()).width(32, 64).heads(2, 2).context(64).config();
    let t = &mut cfg.train;
    t.batch_size = 4;
    t.seq_len = 32;
    t.max_steps = steps;
    t.warmup_steps = 2;
    t.eval_interval = 3;
    t.eval_batches = 2;
    t.log_interval = 1;
    t.grad_accum = 2;
    cfg.validate().unwrap();
    cfg
}

fn dataset(dir: &Path) -> (data::Dataset, Tokenizer) {
    let docs = synthetic::synthetic_corpus(&synthetic::SyntheticOptions { seed: 3, n_docs: 40 });
    let tok = Tokenizer::char_from_text(&docs.concat());
    let ds = data::prepare_dataset(&docs, &tok, 0.1, &dir.join("data"), "test").unwrap();
    (ds, tok)
}

fn params(model: &Model) -> Vec<Vec<f32>> {
    model.params.iter().map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect()
}

fn losses(run: &Path) -> Vec<String> {
    // Loss values as printed in the metrics file (timings excluded).
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{} {} {} {}", v["step"], v["loss"], v["val_loss"], v["routing"])
        })
        .collect()
}

#[test]
fn same_seed_same_run_and_resume_equals_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let (ds, tok) = dataset(tmp.path());
    let cfg = small_run("tiny-itt3", &tok, 6);
    let quiet = RunOptions { quiet: true, stop_at: None };

    let a = tmp.path().join("a");
    let mut ta = Trainer::new(cfg.clone(), &tok, &a, TrainerOptions::default()).unwrap();
    train::run(&mut ta, &ds, &quiet).unwrap();

    let b = tmp.path().join("b");
    let mut tb = Trainer::new(cfg.clone(), &tok, &b, TrainerOptions::default()).unwrap();
    train::run(&mut tb, &ds, &quiet).unwrap();
    assert_eq!(params(&ta.model), params(&tb.model), "same seed, different weights");
    assert_eq!(losses(&a), losses(&b));

    // Stop after 3 steps, drop the trainer, resume from disk, finish.
    let c = tmp.path().join("c");
    let mut tc = Trainer::new(cfg.clone(), &tok, &c, TrainerOptions::default()).unwrap();
    train::run(&mut tc, &ds, &RunOptions { quiet: true, stop_at: Some(3) }).unwrap();
    drop(tc);
    let mut tc = Trainer::resume(&c, None, TrainerOptions::default()).unwrap();
    assert_eq!(tc.state.step, 3);
    train::run(&mut tc, &ds, &quiet).unwrap();
    assert_eq!(params(&ta.model), params(&tc.model), "resumed run differs from the uninterrupted one");
    assert_eq!(ta.optimizer.state().unwrap(), tc.optimizer.state().unwrap());
    assert_eq!(ta.calibration, tc.calibration);
    assert_eq!(losses(&a), losses(&c));

    // A different seed gives a different run.
    let mut other = cfg.clone();
    other.train.seed += 1;
    let d = tmp.path().join("d");
    let mut td = Trainer::new(other, &tok, &d, TrainerOptions::default()).unwrap();
    train::run(&mut td, &ds, &quiet).unwrap();
    assert_ne!(params(&ta.model), params(&td.model));
}

#[test]
fn checkpoint_round_trips_bit_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (ds, tok) = dataset(tmp.path());
    let cfg = small_run("tiny-itt2", &tok, 2);
    let run = tmp.path().join("run");
    let mut t = Trainer::new(cfg, &tok, &run, TrainerOptions::default()).unwrap();
    train::run(&mut t, &ds, &RunOptions { quiet: true, stop_at: None }).unwrap();
    let (model, tok2, info) = checkpoint::load_model(&run).unwrap();
    assert_eq!(params(&model), params(&t.model));
    assert_eq!(
        model.params.iter().map(|p| &p.0).collect::<Vec<_>>(),
        t.model.params.iter().map(|p| &p.0).collect::<Vec<_>>()
    );
    assert_eq!(tok2.fingerprint(), tok.fingerprint());
    assert_eq!(info.config, t.cfg);
    assert_eq!(info.calibration, t.calibration);
    let opt = checkpoint::load_optimizer(&info.dir, &model.params).unwrap();
    assert_eq!(opt, *t.optimizer.state().unwrap());
    let x = Tensor::from_slice(&[1u32, 2, 3, 4], 4, &Device::Cpu).unwrap();
    let run_logits = |m: &Model| -> Vec<f32> {
        m.forward(&x, &SeqLayout::uniform(1, 4), &RoutingOptions::default(), None, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    assert_eq!(run_logits(&model), run_logits(&t.model));
}

#[test]
fn a_tiny_model_overfits_one_batch() {
    let tok = Tokenizer::byte();
    let mut cfg = small_run("tiny", &tok, 150);
    cfg.train.grad_accum = 1;
    cfg.train.lr = 1e-2;
    cfg.train.weight_decay = 0.0;
    let model = Model::new(&cfg.model, 1, &Device::Cpu).unwrap();
    let text = b"the inner thinking transformer thinks harder about hard tokens!";
    let inp: Vec<u32> = text[..32].iter().map(|&b| b as u32).collect();
    let tgt: Vec<u32> = text[1..33].iter().map(|&b| b as u32).collect();
    let mut opt = itt::optim::AdamW::new(&model.params);
    let mut acc = itt::optim::GradAccumulator::new(&model.params);
    let mut loss = f32::MAX;
    for step in 0..150 {
        acc.zero();
        let l = model.loss(&inp, &tgt, 1, 32, &RoutingOptions::default(), None).unwrap();
        loss = l.to_scalar::<f32>().unwrap();
        acc.add(&model.params, &l.backward().unwrap()).unwrap();
        let n = acc.finish();
        opt.step(&model.params, &acc.sums, n, cfg.train.lr_at(step), &cfg.train).unwrap();
    }
    assert!(loss < 0.05, "final loss {loss}");
}

#[test]
fn routed_share_during_training_matches_the_configured_ratio() {
    let tmp = tempfile::tempdir().unwrap();
    let (ds, tok) = dataset(tmp.path());
    let mut cfg = small_run("tiny-itt4", &tok, 2);
    cfg.model.thinking.ratios = vec![0.5, 0.25, 0.75];
    let mut t = Trainer::new(cfg, &tok, &tmp.path().join("r"), TrainerOptions::default()).unwrap();
    let rep = t.step(&ds.train, false).unwrap();
    for ((_, step), s) in &rep.record.stats {
        let want = [0.5, 0.25, 0.75][step - 2];
        // ceil(rho * 32) of 32 tokens per sequence.
        let exact = (want * 32.0f64).ceil() / 32.0;
        assert_eq!(s.share(), exact, "step {step}");
    }
    assert_eq!(rep.record.stats.len(), 2 * 3);
}

#[test]
fn existing_runs_are_never_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let (ds, tok) = dataset(tmp.path());
    let cfg = small_run("tiny", &tok, 1);
    let run = tmp.path().join("run");
    let mut t = Trainer::new(cfg.clone(), &tok, &run, TrainerOptions::default()).unwrap();
    train::run(&mut t, &ds, &RunOptions { quiet: true, stop_at: None }).unwrap();
    let before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let err = Trainer::new(cfg, &tok, &run, TrainerOptions::default()).err().unwrap().to_string();
    assert!(err.contains("--resume"), "{err}");
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), before);
}

#[test]
fn a_miniature_experiment_grid_writes_its_table_and_plot() {
    use itt::apps::experiment::{self, ExperimentOptions};
    let tmp = tempfile::tempdir().unwrap();
    for name in ["table2", "table3"] {
        let opts = ExperimentOptions {
            name: name.into(),
            sizes: vec!["tiny".into()],
            data: vec![itt::train::DataSpec::default()],
            seeds: 2,
            steps: Some(2),
            batch_size: Some(2),
            seq_len: Some(16),
            eval_batches: 2,
            problems: if name == "table2" { 1 } else { 0 },
            variants: vec![],
            lr_scales: vec![1.0],
            out: tmp.path().join("shared"),
            jobs: 1,
            quiet: true,
            device: candle_core::Device::Cpu,
            command: format!("itt experiment {name} (test)"),
        };
        let r = experiment::run(&opts).unwrap();
        // table2: dense; ITT top-k, causal, 5 ratio settings, 2 extended, off; Loop trained, off.
        // table3: ITT, without RTC, without TSE (top-k, causal, off each); without ATR (trained,
        // off); dense.
        let want_rows = if name == "table2" { 13 } else { 12 };
        assert_eq!(r.rows.len(), want_rows);
        assert!(r.rows.iter().all(|row| row.val_loss_mean.is_finite() && row.seeds == 2));
        for row in &r.rows {
            let is_dense = row.label == "Dense";
            assert_eq!(row.vs_dense.is_some(), !is_dense, "{}", row.label);
            let gain = matches!(row.role, experiment::Role::Trained | experiment::Role::Causal) && !is_dense;
            assert_eq!(row.thinking_gain.is_some(), gain, "{} {}", row.label, row.setting);
            if gain {
                // The gain is the difference of two rows of the table, seed by seed.
                let off = r.rows.iter().find(|o| o.variant == row.variant && o.setting == "thinking off").unwrap();
                let g = row.thinking_gain.unwrap();
                assert!((g.mean - (off.val_loss_mean - row.val_loss_mean)).abs() < 1e-9);
                assert!(g.ci95.is_some());
            }
        }
        if name == "table2" {
            // Six held-out problems answered by dense, by ITT causally and off, by Loop and Loop off.
            let answered: Vec<_> = r.runs.iter().filter_map(|x| x.solved.as_ref()).collect();
            assert_eq!(answered.len(), 5 * 2);
            assert!(answered.iter().all(|s| s.asked() == 6));
        }
        let md = std::fs::read_to_string(opts.out.join(name).join("results.md")).unwrap();
        assert!(md.contains("| ITT x4 |") && md.contains("±") && md.contains("(test)"), "{md}");
        let png = std::fs::read(opts.out.join(name).join("loss.png")).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 2000);
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(opts.out.join(name).join("results.json")).unwrap()).unwrap();
        assert_eq!(json["runs"].as_array().unwrap().len(), want_rows * 2);
        // Re-running reuses the finished runs (same numbers).
        let again = experiment::run(&opts).unwrap();
        assert_eq!(again.rows[0].val_loss_mean, r.rows[0].val_loss_mean);
        if name == "table3" {
            // --variants picks rows of the grid (the same runs, reused); a name not in it is refused.
            let some = ExperimentOptions { variants: vec!["dense".into(), "itt4".into()], ..opts.clone() };
            let sub = experiment::run(&some).unwrap();
            assert_eq!(sub.rows.len(), 3 + 1);
            let itt = r.rows.iter().find(|x| x.variant == "itt4").unwrap();
            assert_eq!(sub.rows.iter().find(|x| x.variant == "itt4").unwrap().val_loss_mean, itt.val_loss_mean);
            let bad = ExperimentOptions { variants: vec!["itt9".into()], ..opts.clone() };
            let err = experiment::run(&bad).unwrap_err().to_string();
            assert!(err.contains("no variant 'itt9'") && err.contains("itt4-no-rtc"), "{err}");
        }
    }
}

#[test]
fn a_killed_grid_run_continues_from_its_checkpoint_with_the_same_numbers() {
    use itt::apps::experiment::{self, ExperimentOptions};
    let tmp = tempfile::tempdir().unwrap();
    let opts = |out: &str| ExperimentOptions {
        name: "table1".into(),
        sizes: vec!["tiny".into()],
        seeds: 1,
        steps: Some(6),
        batch_size: Some(2),
        seq_len: Some(16),
        eval_batches: 2,
        problems: 0,
        variants: vec!["dense".into()],
        out: tmp.path().join(out),
        quiet: true,
        command: "itt experiment table1 (test)".into(),
        ..Default::default()
    };
    let whole = experiment::run(&opts("whole")).unwrap();
    let run_a = tmp.path().join("whole/runs/dense-s0");
    // A grid run writes a checkpoint at every evaluation and keeps the newest.
    let cfg = RunConfig::load(&run_a.join("config.json")).unwrap();
    assert_eq!(cfg.train.checkpoint_interval, cfg.train.eval_interval);
    assert_eq!(std::fs::read_dir(run_a.join("checkpoints")).unwrap().count(), 1);

    // The same run started by hand with another checkpoint cadence and stopped at step 3, as a
    // kill would leave it: the grid continues it, and it ends with the uninterrupted run's bits.
    let ds = data::Dataset::open(&tmp.path().join("whole/data")).unwrap();
    let tok = ds.load_tokenizer().unwrap();
    let mut by_hand = cfg.clone();
    by_hand.train.checkpoint_interval = 2;
    by_hand.train.keep_checkpoints = 4;
    let run_b = tmp.path().join("killed/runs/dense-s0");
    let mut t = Trainer::new(by_hand.clone(), &tok, &run_b, TrainerOptions::default()).unwrap();
    train::run(&mut t, &ds, &RunOptions { quiet: true, stop_at: Some(3) }).unwrap();
    drop(t);
    let continued = experiment::run(&opts("killed")).unwrap();
    assert_eq!(continued.rows[0].val_loss_mean.to_bits(), whole.rows[0].val_loss_mean.to_bits());
    assert_eq!(losses(&run_b), losses(&run_a));

    // A run that trains differently (another learning rate) is refused, not reused or retrained.
    let mut other = cfg.clone();
    other.train.lr *= 2.0;
    let run_c = tmp.path().join("other/runs/dense-s0");
    let mut t = Trainer::new(other, &tok, &run_c, TrainerOptions::default()).unwrap();
    train::run(&mut t, &ds, &RunOptions { quiet: true, stop_at: Some(2) }).unwrap();
    drop(t);
    let err = experiment::run(&opts("other")).unwrap_err().to_string();
    assert!(err.contains("trained with another configuration"), "{err}");
}

#[test]
fn a_grid_trained_two_runs_at_a_time_gives_the_same_numbers() {
    use itt::apps::experiment::{self, ExperimentOptions};
    let tmp = tempfile::tempdir().unwrap();
    let opts = |out: &str, jobs: usize| ExperimentOptions {
        name: "table1".into(),
        seeds: 2,
        steps: Some(4),
        batch_size: Some(2),
        seq_len: Some(16),
        eval_batches: 2,
        problems: 0,
        variants: vec!["dense".into(), "itt4".into()],
        out: tmp.path().join(out),
        jobs,
        quiet: true,
        command: "itt experiment table1 (test)".into(),
        ..Default::default()
    };
    let one = experiment::run(&opts("one", 1)).unwrap();
    let two = experiment::run(&opts("two", 2)).unwrap();
    assert_eq!(one.runs.len(), two.runs.len());
    for (a, b) in one.runs.iter().zip(&two.runs) {
        assert_eq!((&a.variant, a.seed, &a.setting), (&b.variant, b.seed, &b.setting));
        assert_eq!(a.val_loss.to_bits(), b.val_loss.to_bits(), "{} seed {} {}", a.variant, a.seed, a.setting);
    }
    let err = experiment::run(&opts("none", 0)).unwrap_err().to_string();
    assert!(err.contains("--jobs must be at least 1"), "{err}");
}

#[test]
fn an_experiment_over_two_corpora_pools_them_and_sweeps_the_learning_rate() {
    use itt::apps::experiment::{self, ExperimentOptions, Role};
    let tmp = tempfile::tempdir().unwrap();
    let words = ["the cat sat on the mat. ", "a dog ran to the park! ", "we think, therefore we are. "];
    let mut paths = vec![];
    for (i, name) in ["one.txt", "two.txt"].iter().enumerate() {
        let text: String = (0..300).map(|k| words[(k * (i + 1)) % 3]).collect();
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        paths.push(p.display().to_string());
    }
    let spec = |p: &str| itt::train::DataSpec { path: p.into(), ..Default::default() };
    let opts = ExperimentOptions {
        name: "table1".into(),
        data: paths.iter().map(|p| spec(p)).collect(),
        seeds: 2,
        steps: Some(2),
        batch_size: Some(2),
        seq_len: Some(16),
        eval_batches: 2,
        problems: 0,
        variants: vec!["dense".into(), "dense2x".into(), "itt4".into()],
        lr_scales: vec![1.0, 2.0],
        out: tmp.path().join("exp"),
        quiet: true,
        command: "itt experiment table1 (test)".into(),
        ..Default::default()
    };
    let r = experiment::run(&opts).unwrap();
    assert_eq!(r.corpora, ["one-char", "two-char"]);
    // Each corpus in its own folder.
    for c in &r.corpora {
        assert!(opts.out.join(c).join("runs").join("itt4-lr2-s1").join("latest").exists(), "{c}");
    }
    // Rows: dense, dense2x and their lr2 twins (trained), itt4 and itt4-lr2 (top-k, causal,
    // off): 10 per corpus and 10 pooled.
    for c in ["one-char", "two-char", "pooled"] {
        assert_eq!(r.rows.iter().filter(|row| row.corpus == c).count(), 10, "{c}");
    }
    // FLOPs against the dense baseline: twice the layers cost about twice (the head is shared).
    let deeper = r.rows.iter().find(|x| x.corpus == "one-char" && x.variant == "dense2x").unwrap();
    assert!(deeper.flops_vs_dense > 1.5 && deeper.flops_vs_dense < 2.01, "{}", deeper.flops_vs_dense);
    let dense = r.rows.iter().find(|x| x.corpus == "one-char" && x.variant == "dense").unwrap();
    assert_eq!(dense.flops_vs_dense, 1.0);
    // The pooled difference is the mean over all four (corpus, seed) pairs of its corpora's.
    let pooled =
        r.rows.iter().find(|x| x.corpus == "pooled" && x.variant == "itt4-lr2" && x.role == Role::Trained).unwrap();
    let per: Vec<f64> = ["one-char", "two-char"]
        .iter()
        .map(|c| {
            r.rows
                .iter()
                .find(|x| x.corpus == *c && x.variant == "itt4-lr2" && x.role == Role::Trained)
                .unwrap()
                .vs_dense
                .unwrap()
                .mean
        })
        .collect();
    let vs = pooled.vs_dense.unwrap();
    assert_eq!(vs.n, 4);
    assert!((vs.mean - (per[0] + per[1]) / 2.0).abs() < 1e-9);
    // Best rates: per corpus and pooled, for dense, dense2x and ITT.
    assert_eq!(r.best_lr.len(), 9);
    for b in r.best_lr.iter().filter(|b| b.corpus != "pooled") {
        let rows: Vec<_> = r
            .rows
            .iter()
            .filter(|x| {
                x.corpus == b.corpus
                    && x.role == Role::Trained
                    && (x.variant == b.model || x.variant == format!("{}-lr2", b.model))
            })
            .collect();
        let least = rows.iter().map(|x| x.val_loss_mean).fold(f64::INFINITY, f64::min);
        assert_eq!(b.val_loss_mean, least, "{} {}", b.corpus, b.model);
        // The label names the model; the chosen multiplier has its own column.
        assert!(!b.label.contains("(lr x"), "{} {}: label {:?}", b.corpus, b.model, b.label);
        // The FLOPs ratio is the main table's (same corpus vocabulary).
        let main = rows.iter().find(|x| x.val_loss_mean == least).unwrap();
        assert!((b.flops_vs_dense - main.flops_vs_dense).abs() < 1e-9, "{} {}", b.corpus, b.model);
    }
    // Token classes of ITT against dense: each group's contributions add up to the whole.
    for v in ["itt4", "itt4-lr2"] {
        let mine: Vec<_> = r.token_classes.iter().filter(|c| c.corpus == "one-char" && c.variant == v).collect();
        let whole = mine.iter().find(|c| c.group == "all").unwrap();
        assert_eq!(whole.diff.n, 2);
        for g in ["frequency", "word", "extra steps"] {
            let sum: f64 = mine.iter().filter(|c| c.group == g).map(|c| c.contribution).sum();
            assert!((sum - whole.contribution).abs() < 1e-5, "{v} {g}: {sum} vs {}", whole.contribution);
        }
        assert!(mine.iter().any(|c| c.group == "L1 step 2" && c.class == "took it"));
    }
    let md = std::fs::read_to_string(opts.out.join("table1").join("results.md")).unwrap();
    assert!(md.contains("### one-char") && md.contains("### Pooled over 2 corpora") && md.contains("own best"), "{md}");
    // The same folder with another tokenizer is refused, not silently reused.
    let other = ExperimentOptions {
        data: paths.iter().map(|p| itt::train::DataSpec { tokenizer: "byte".into(), ..spec(p) }).collect(),
        out: opts.out.join("one-char"),
        ..opts.clone()
    };
    let one = ExperimentOptions { data: vec![other.data[0].clone()], ..other };
    let err = experiment::run(&one).unwrap_err().to_string();
    assert!(err.contains("another --out"), "{err}");
}

#[test]
fn bf16_training_tracks_f32_and_resumes_exactly() {
    // Without AMX or AVX512_BF16 a bf16 run falls back to f32 products; this test checks the bf16 numerics
    // wherever it runs, emulated on such CPUs (the only test of this binary that trains in bf16).
    std::env::set_var("ITT_BF16_EMULATE", "1");
    let tmp = tempfile::tempdir().unwrap();
    let (ds, tok) = dataset(tmp.path());
    let mut cfg = small_run("tiny-itt3", &tok, 6);
    let quiet = RunOptions { quiet: true, stop_at: None };
    let f32_run = tmp.path().join("f32");
    let mut t32 = Trainer::new(cfg.clone(), &tok, &f32_run, TrainerOptions::default()).unwrap();
    train::run(&mut t32, &ds, &quiet).unwrap();

    cfg.train.precision = config::Precision::Bf16;
    let a = tmp.path().join("bf16");
    let mut ta = Trainer::new(cfg.clone(), &tok, &a, TrainerOptions::default()).unwrap();
    train::run(&mut ta, &ds, &quiet).unwrap();
    // The precision is saved with the run, and the products really were rounded.
    let saved = std::fs::read_to_string(checkpoint::resolve(&a).unwrap().join("config.json")).unwrap();
    assert!(saved.contains("\"precision\": \"bf16\""), "{saved}");
    assert_ne!(params(&t32.model), params(&ta.model));
    let last = |run: &Path| -> f64 {
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        v["val_loss"].as_f64().unwrap()
    };
    let (l32, l16) = (last(&f32_run), last(&a));
    assert!((l16 - l32).abs() < 0.02 * l32, "validation loss f32 {l32} vs bf16 {l16}");

    // Resume from step 3 in bf16 (the precision comes from the checkpoint): bit-exact.
    let c = tmp.path().join("bf16-resumed");
    let mut tc = Trainer::new(cfg.clone(), &tok, &c, TrainerOptions::default()).unwrap();
    train::run(&mut tc, &ds, &RunOptions { quiet: true, stop_at: Some(3) }).unwrap();
    drop(tc);
    let mut tc = Trainer::resume(&c, None, TrainerOptions::default()).unwrap();
    assert_eq!(tc.cfg.train.precision, config::Precision::Bf16);
    train::run(&mut tc, &ds, &quiet).unwrap();
    assert_eq!(params(&ta.model), params(&tc.model), "resumed bf16 run differs");
    assert_eq!(losses(&a), losses(&c));
}

#[test]
fn non_finite_weights_stop_or_skip_a_step_and_are_never_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let (ds, tok) = dataset(tmp.path());
    let mut cfg = small_run("tiny-itt2", &tok, 4);
    let run = tmp.path().join("run");
    let mut t = Trainer::new(cfg.clone(), &tok, &run, TrainerOptions::default()).unwrap();
    let (name, var) = t.model.params[1].clone();
    var.set(&(var.as_tensor() * f64::NAN).unwrap()).unwrap();
    let e = t.save().err().unwrap().to_string();
    assert!(e.contains(&name) && e.contains("non-finite") && e.contains("no checkpoint was written"), "{e}");
    assert!(!run.join("checkpoints").exists());
    let e = t.step(&ds.train, false).err().unwrap().to_string();
    assert!(e.starts_with("training diverged at step 1: the loss is NaN") && e.contains("--lr"), "{e}");

    // skip: no update (weights, optimiser and thresholds as they were), the data moves on.
    cfg.train.on_nonfinite = config::OnNonFinite::Skip;
    let mut t = Trainer::new(cfg, &tok, &tmp.path().join("skip"), TrainerOptions::default()).unwrap();
    let (_, var) = t.model.params[1].clone();
    var.set(&(var.as_tensor() * f64::NAN).unwrap()).unwrap();
    let before = (t.optimizer.state().unwrap().into_owned(), t.calibration.clone(), t.state.data_rng);
    let rep = t.step(&ds.train, false).unwrap();
    assert_eq!(rep.skipped.as_deref(), Some("the loss is NaN"));
    assert_eq!((t.state.step, t.state.skipped_batches, t.state.last_train_loss), (1, 1, None));
    assert_eq!((&*t.optimizer.state().unwrap(), &t.calibration), (&before.0, &before.1));
    assert_ne!(t.state.data_rng, before.2);
    assert!(params(&t.model)[0].iter().all(|x| x.is_finite()));
}

/// The GPU optimiser (gradient sums and AdamW moments as tensors, the update composed from
/// tensor ops; DESIGN §15) run on CPU tensors against the host optimiser: same losses, weights
/// and moments within 1e-5 over 4 steps with 2 micro-batches each, decay, clipping and the
/// thinking group included. Not bit-exact: its gradient norm is summed in another order.
/// Its checkpoint holds host tensors that the host optimiser resumes from.
#[test]
fn the_device_optimiser_matches_the_host_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (ds, tok) = dataset(tmp.path());
    let mut cfg = small_run("tiny-itt2", &tok, 4);
    cfg.train.grad_clip = 0.5; // small enough to clip, so the clip factor is compared too
    let quiet = RunOptions { quiet: true, stop_at: None };
    let mut host = Trainer::new(cfg.clone(), &tok, &tmp.path().join("host"), TrainerOptions::default()).unwrap();
    train::run(&mut host, &ds, &quiet).unwrap();
    let dev_dir = tmp.path().join("device");
    let on_device = TrainerOptions { device_optimizer: true, ..Default::default() };
    let mut dev = Trainer::new(cfg.clone(), &tok, &dev_dir, on_device).unwrap();
    assert!(dev.optimizer.is_on_device());
    train::run(&mut dev, &ds, &quiet).unwrap();

    let max_diff = |a: &[Vec<f32>], b: &[Vec<f32>]| -> f32 {
        a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    };
    let weights = max_diff(&params(&host.model), &params(&dev.model));
    let saved = checkpoint::load_optimizer(&checkpoint::resolve(&dev_dir).unwrap(), &dev.model.params).unwrap();
    let host_state = host.optimizer.state().unwrap();
    let (m, v) = (max_diff(&host_state.m, &saved.m), max_diff(&host_state.v, &saved.v));
    println!("device vs host optimiser, max |difference|: weights {weights:e}, m {m:e}, v {v:e}");
    assert!(weights < 1e-5 && m < 1e-5 && v < 1e-5, "weights {weights:e}, m {m:e}, v {v:e}");
    assert_eq!(saved.t, host_state.t);
    let loss = |run: &Path| -> Vec<f64> {
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
            .collect()
    };
    let (a, b) = (loss(&tmp.path().join("host")), loss(&dev_dir));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * x.abs(), "losses {a:?} vs {b:?}");
    }

    // The device optimiser's checkpoint resumes on the host optimiser.
    let resumed = Trainer::resume(&dev_dir, None, TrainerOptions::default()).unwrap();
    assert_eq!((resumed.state.step, &*resumed.optimizer.state().unwrap()), (4, &saved));
    assert_eq!(params(&resumed.model), params(&dev.model));
}
