"""One batch to loss sums (the student's wrapper that runs the loss), and held-out quality; shared by
training and evaluation."""
