"""Engine glue shared by the bundles: prepare_batch functions, handlers, metrics, writers, plots."""
from .metrics import auroc, auroc_per_class, bootstrap_auroc, evaluate_classification, fit_thresholds_ctclip, fit_thresholds_youden, macro_auroc, roc_curve, to_jsonable
from .retrieval import cross_modal_retrieval, label_relevance, mean_average_precision_at_k, retrieval_metrics, similarity_matrix
from .writers import read_predictions_csv, write_json, write_per_class_tables, write_predictions_csv
