"""What a study says: the paired comparison's statistics, the summary and its tables and plots, the paper's own
numbers, and Optuna's views of a search rebuilt from MLflow."""
