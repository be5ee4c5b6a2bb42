"""The method: the token encoder (z = [q | p]), leapfrog dynamics, the predictors, the objectives with their
global-batch statistics, and the model that puts one method (methods.METHODS) together for two views."""
