"""The one shared module: shifted MuJoCo domains, offline datasets, scores, evaluation, and the run harness.

    from envs import DOMAINS, make_env, make_vec_env, domain_info, PHYSICS # domains.py
    from envs import load_dataset, subsample, Dataset                       # datasets.py
    from envs import reference_scores, reference_info, normalized_score     # scores.py
    from envs import evaluate, EvalResult                                   # evaluation.py
    from envs.run import open_run, train_loop, run_stage, write_atomic      # run.py: the run harness
    from envs.diagnostics import held_out_separation, filter_diagnostics    # diagnostics.py
"""
from envs.domains import (DEFAULT_PHYSICS, DOMAINS, PHYSICS, TASKS, Change, DomainInfo, check_domain, check_physics,
                          compile_model, domain_info, make_env, make_vec_env)
from envs.datasets import QUALITIES, Dataset, generated_dataset_id, load_dataset, save_hdf5, subsample
from envs.scores import REFERENCE_CHOICES, dataset_score, normalized_score, reference_info, reference_scores
from envs.evaluation import EvalResult, evaluate
