"""The one shared module: shifted MuJoCo domains, offline datasets, scores and evaluation.

    from envs import DOMAINS, make_env, make_vec_env, domain_info          # domains.py
    from envs import load_dataset, subsample, Dataset                       # datasets.py
    from envs import reference_scores, normalized_score                     # scores.py
    from envs import evaluate, EvalResult                                   # evaluation.py
"""
from envs.domains import DOMAINS, TASKS, Change, DomainInfo, domain_info, make_env, make_vec_env, check_domain
from envs.datasets import QUALITIES, Dataset, generated_dataset_id, load_dataset, save_hdf5, subsample
from envs.scores import dataset_score, normalized_score, reference_scores
from envs.evaluation import EvalResult, evaluate
