"""``prilora`` command line. Thin: ``arguments.py`` parses and validates the flags into specs; this module
hands them to the runners and says how each ended.

Bad input ends with one line on stderr and exit code 2; a failure of the machine (a full disk) with one
line and exit code 1; an interrupted run with a pointer to ``--resume`` and exit code 130.
"""

from __future__ import annotations

import json
import os
import sys

from .arguments import UsageError, build_clm_spec, build_parser, build_spec


def run_paths(args, data_dir: str | None):
    """Where and how a training command runs (the run flags both train and train-clm take)."""
    from .glue.runner import RunPaths

    return RunPaths(output_dir=args.output_dir, data_dir=data_dir, resume=args.resume, overwrite=args.overwrite,
                    save_steps=args.save_steps, keep_checkpoints=args.keep_checkpoints, quiet=args.quiet,
                    gradient_accumulation=args.gradient_accumulation, compile=args.compile, verbose=args.verbose)


def cmd_train(args) -> int:
    from .glue.runner import run_glue

    results = run_glue(build_spec(args), run_paths(args, data_dir=args.data_dir))
    if not results:  # not the main process of a multi-process launch
        return 0
    summary = {k: results[k] for k in ("task", "method", "seed", "steps", "lora_params", "a_sparsity",
                                       "collapsed", "train_runtime_s")}
    summary["score"] = results["metrics"]["score"]
    summary["majority_class_score"] = (results.get("majority_baseline") or {}).get("score")  # the floor to clear
    print(json.dumps(summary) if args.json else train_sentence(results, args.output_dir))
    return 0


SCORE_NAMES = {"accuracy": "accuracy", "matthews_correlation": "Matthews correlation",
               "pearson_spearman_mean": "mean of Pearson and Spearman correlations"}


def train_sentence(results: dict, out: str) -> str:
    """How a run ended, for a person: the score against the floor, the cost, where the files are."""
    from .glue.tasks import get_task

    task = get_task(results["task"])
    split = "held-out training examples" if results.get("holdout") else next(iter(results["eval_examples"]))
    floor = (results.get("majority_baseline") or {}).get("score")
    against = f" (always the commonest label: {100 * floor:.2f})" if floor is not None else ""
    score = results["metrics"]["score"]
    shown = "n/a" if score is None else f"{100 * score:.2f}"
    pruned = f", A {100 * results['a_sparsity']:.0f}% zeros" if results.get("a_sparsity") is not None else ""
    collapsed = f"; the run collapsed ({results['collapse_reason']})" if results["collapsed"] else ""
    if not collapsed and floor is not None and score is not None and score <= floor:
        collapsed = "; not above always answering the commonest label: the model learned nothing usable here"
    return (f"{task.folder} {split} {SCORE_NAMES.get(task.score_metric, task.score_metric)}: {shown}{against}"
            f"{collapsed}. {results['steps']} optimizer steps in {results['train_runtime_s']:.0f} s{pruned}. "
            f"Adapter and results.json in {out}")


def cmd_train_clm(args) -> int:
    from .causal_lm import run_clm

    results = run_clm(build_clm_spec(args), run_paths(args, data_dir=None))
    if not results:  # not the main process of a multi-process launch
        return 0
    if args.json:
        print(json.dumps({k: results[k] for k in ("method", "seed", "steps", "lora_params", "a_sparsity", "metrics",
                                                  "train_runtime_s")}))
    else:
        m = results["metrics"]
        print(f"Evaluation loss {m['initial_eval_loss']:.4f} -> {m['eval_loss']:.4f} (perplexity "
              f"{m['initial_perplexity']:.2f} -> {m['perplexity']:.2f}). {results['steps']} optimizer steps in "
              f"{results['train_runtime_s']:.0f} s, A {100 * results['a_sparsity']:.0f}% zeros. Adapter and "
              f"results.json in {args.output_dir}")
    return 0


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def cmd_export(args) -> int:
    from . import export

    _quiet_transformers()
    if args.base is not None and args.kind != "merged":
        raise export.AdapterError(f"--base applies to export merged only, not export {args.kind}")
    if args.kind == "merged":
        info = export.to_merged(args.adapter, args.out, base=args.base)
        base = info["base"] + (" (dequantized from 4-bit NF4, as it was trained)" if info["dequantized_4bit"] else "")
        print(f"merged {args.adapter} into {base} -> {args.out} ({info['params']:,} parameters; "
              f"max |logit difference| to the unmerged model {info['max_abs_logit_diff']:.2g})")
    elif args.kind == "sparse":
        info = export.to_sparse(args.adapter, args.out)
        print(f"{args.adapter} -> {args.out}: weights file {info['dense_file_bytes']:,} -> {info['sparse_file_bytes']:,} "
              f"bytes ({100 * (1 - info['sparse_file_bytes'] / info['dense_file_bytes']):.1f}% smaller); LoRA "
              f"matrices {info['lora_dense_bytes']:,} -> {info['lora_sparse_bytes']:,} bytes "
              f"({info['sparse_matrices']} of {info['matrices']} stored sparse)")
    else:
        info = export.to_dense(args.adapter, args.out)
        print(f"{args.adapter} -> {args.out}: standard PEFT adapter, {info['dense_file_bytes']:,} bytes")
    return 0


def cmd_inspect(args) -> int:
    from .inspection import describe, format_table, plot
    from .run_folder import RunError

    try:
        info = describe(args.adapter, args.layer_pattern)
    except ValueError as e:  # the layer pattern (a bad adapter is an AdapterError)
        raise RunError(str(e)) from None
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    if args.plot:
        print(f"heatmap: {plot(info, args.plot)}", file=sys.stderr)
    return 0


def cmd_verify(args) -> int:
    from .run_folder import verify_tree

    damaged = False
    for entry in verify_tree(args.path):
        damaged |= entry["status"] == "damaged"
        if args.json:
            print(json.dumps(entry))
            continue
        detail = {"intact": f"{entry['files']} files, {entry['bytes']:,} bytes, as written (SHA-256)",
                  "damaged": "; ".join(entry["problems"]),
                  "incomplete": "its save was cut short (not resumed from)",
                  "unverified": "no manifest (written before prilora wrote them, or by another tool); "
                                "its files were read back by format, not checked byte for byte"}[entry["status"]]
        added = f"; not in its manifest (added since): {', '.join(entry['added'])}" if entry["added"] else ""
        print(f"{entry['folder']}: {entry['status']}: {detail}{added}")
    return 1 if damaged else 0


def cmd_bench(args) -> int:
    from .bench import BUILTIN_MODELS, METHODS, format_result, run_bench
    from .run_folder import RunError, quiet_loading, unwritable, write_json_atomic

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise RunError(f"unknown bench method {unknown[0]!r}: choose from {', '.join(METHODS)}")
    for name, value in (("--batch-size", args.batch_size), ("--seq-len", args.seq_len), ("--steps", args.steps),
                        ("--rounds", args.rounds)):
        if value < 1:
            raise RunError(f"{name} must be >= 1, got {value}")
    if args.model not in BUILTIN_MODELS and not os.path.isdir(args.model):
        raise RunError(f"--model {args.model!r} is neither one of {', '.join(BUILTIN_MODELS)} nor a local model folder")
    if args.json and os.path.isdir(args.json):
        raise RunError(f"--json {args.json} is a folder: pass a file path")
    if args.json and (why := unwritable(os.path.dirname(args.json) or ".")):
        raise RunError(f"--json {args.json} cannot be written ({why}): pass another file path")
    if args.no_timing and not (args.ops or args.memory or args.event_sizes or args.inference):
        raise RunError("--no-timing leaves nothing to measure: add --ops, --memory, --event-sizes or --inference")
    with quiet_loading():  # the models' load reports and PEFT's deprecation warning: nothing to act on here
        result = run_bench(args)
    print(format_result(result))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        write_json_atomic(args.json, result)
        print(f"raw numbers: {args.json}")
    return 0


def cmd_report(args) -> int:
    from .study.report import build_report

    text = build_report(args.results, args.out, plots_dir=args.plots, notes=args.notes, reference=args.reference,
                        progress=args.progress,
                        command="prilora report " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["report"] else None)
    print(f"wrote {args.out} ({len(text.splitlines())} lines)")
    return 0


def cmd_sweep(args) -> int:
    from .study.sweep import Sweep, SweepError, exclusive, run_sweeps, study_progress

    if args.jobs is not None and args.jobs < 1:
        raise SweepError(f"--jobs must be >= 1, got {args.jobs}")
    sweeps = [Sweep(path, jobs=args.jobs) for path in args.spec]
    for sweep in sweeps:
        sweep.check()  # a bad later spec fails now, not hours into the first
        if not args.dry_run:
            sweep.check_paths()  # before the lock creates runs_dir
    if args.dry_run:
        states = [(sweep, *sweep.dry_run()) for sweep in sweeps]
        if len(sweeps) > 1:
            study = study_progress(sweeps, states)
            print(f"sweep, all {len(sweeps)} specs: {study['planned']} distinct runs, {study['done']} done, "
                  f"{len(study['left'])} to run" + (f"; {study['estimate']}" if study["left"] else ""), file=sys.stderr)
        return 0
    with exclusive(sweeps):
        return run_sweeps(sweeps)


TRAINING_COMMANDS = ("train", "train-clm")  # the ones with checkpoints to point at


def main(argv=None) -> int:
    from .export import AdapterError
    from .glue.data import GlueDataError
    from .study.report import ReportError
    from .run_folder import RunError, is_main_process, stop_with_parent

    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2
    try:
        stop_with_parent()
        return COMMANDS[args.command](args)
    except (RunError, GlueDataError, AdapterError, ReportError) as e:
        print(f"prilora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine, not the input: a full disk, a folder removed meanwhile
        rank = "" if is_main_process() else f" (rank {os.environ.get('RANK')})"  # it may have hit one process only
        resume = f"; checkpoints stay in {args.output_dir}: rerun with --resume once fixed" \
            if args.command in TRAINING_COMMANDS else ""
        print(f"prilora {args.command}{rank}: error: {e}{resume}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if not is_main_process():  # under torchrun, rank 0 speaks for all
            return 130
        if args.command not in TRAINING_COMMANDS:  # no checkpoints to point at
            where = f"; nothing was written to {args.out}" if args.command == "export" else ""  # see new_folder
            print(f"prilora {args.command}: interrupted{where}", file=sys.stderr)
            return 130
        out = args.output_dir
        when = f" {e}" if str(e) else ""  # SaveOnInterrupt says after which step, and where it saved
        print(f"prilora {args.command}: interrupted{when}; checkpoints stay in {out}: rerun with --resume to continue",
              file=sys.stderr)
        return 130


COMMANDS = {"train": cmd_train, "train-clm": cmd_train_clm, "export": cmd_export, "inspect": cmd_inspect,
            "sweep": cmd_sweep, "report": cmd_report, "bench": cmd_bench, "verify": cmd_verify}

if __name__ == "__main__":
    sys.exit(main())
