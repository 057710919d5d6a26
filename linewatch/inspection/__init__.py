"""What calibration and the worker must compute identically, written once: frame decode and model
input (``frames``), the mask step (``mask``), regions and the verdict (``verdict``), the learned
region extent (``extent``), stored classifiers (``forest``), image planes (``planes``) and the
defect categories (``categorize``). Services import it; it imports no service
(docs/architecture.md)."""
