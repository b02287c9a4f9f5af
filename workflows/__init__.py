"""Engine glue shared by the bundles: prepare_batch functions, handlers, metrics, writers, plots."""
