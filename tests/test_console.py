"""What the console shows: one line per epoch for `hamjepa train`, short table headers for a study."""

from hamjepa.study.phases import short_names
from hamjepa.train.launch import progress_line


def test_an_epoch_line_says_where_the_run_is_its_loss_objective_speed_and_data_wait():
    line = progress_line({"epoch": 2, "train/loss": 1.23456, "val_knn20_top1": 63.75, "val_knn20_top1_q": 70.0,
                          "train/images_per_s": 617.3, "train/data_wait_fraction": 0.018, "diverged": 0}, 8)
    assert line == "epoch 2/8  loss 1.2346  val_knn20_top1 63.75  617 images/s  data wait 1.8%"
    assert progress_line({"epoch": 0, "val_knn10_top1": 55.0}, 8) == "epoch 0/8  val_knn10_top1 55.00"
    diverged = progress_line({"epoch": 3, "diverged": 1, "diverged_reason": "epoch 3: non-finite loss"}, 8)
    assert diverged.endswith("diverged: epoch 3: non-finite loss")


def test_table_headers_are_the_last_part_of_a_key_unless_two_share_it():
    assert short_names(["predictor.dt", "predictor.steps", "hamjepa_loss.w_budget"]) == {
        "predictor.dt": "dt", "predictor.steps": "steps", "hamjepa_loss.w_budget": "w_budget"}
    assert short_names(["predictor.dt", "optim.dt"]) == {"predictor.dt": "predictor.dt", "optim.dt": "optim.dt"}
