"""The lab: data, models, one training loop, probes, plots and reports behind
``batchnorm demo`` and ``batchnorm reproduce ioffe2015``.

* :mod:`~batchnorm.lab.data`: MNIST-1D (generated, cached), IDX and ``.npz`` loaders
* :mod:`~batchnorm.lab.models`: the article's model, the Ioffe & Szegedy (2015) network
* :mod:`~batchnorm.lab.fit`: the training loop shared by everything
* :mod:`~batchnorm.lab.probes`: hook-based activation quantiles and gradient norms
* :mod:`~batchnorm.lab.plots`, :mod:`~batchnorm.lab.report`: figures, ``report.html``
* :mod:`~batchnorm.lab.demo`, :mod:`~batchnorm.lab.reproduce`: the two commands
* :mod:`~batchnorm.lab.timing`: the benchmarks' timing helper; epoch time per batch-norm
  implementation (``make bench``)

Needs the ``lab`` extra (mnist1d, matplotlib; rich for the audit's table), imported only
where used (:mod:`~batchnorm.lab.extras`).
"""

from batchnorm.lab.data import DataError, Dataset, load_dataset
from batchnorm.lab.fit import History, evaluate, fit
from batchnorm.lab.models import article_model, ioffe_mlp
from batchnorm.lab.probes import ActivationQuantiles, GradientNorms, Probe
from batchnorm.lab.report import write_report

__all__ = [
    "ActivationQuantiles",
    "DataError",
    "Dataset",
    "GradientNorms",
    "History",
    "Probe",
    "article_model",
    "evaluate",
    "fit",
    "ioffe_mlp",
    "load_dataset",
    "write_report",
]
