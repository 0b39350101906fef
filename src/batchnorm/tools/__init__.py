"""Model-level tools, each working on a whole model (exported by :mod:`batchnorm`):

* :mod:`~batchnorm.tools.convert`: ``convert``, ``freeze``/``unfreeze``,
  ``convert_sync_batchnorm``/``revert_sync_batchnorm``;
* :mod:`~batchnorm.tools.fold` (with :mod:`~batchnorm.tools.affine`): ``fold``;
* :mod:`~batchnorm.tools.recalibrate`: ``recalibrate``;
* :mod:`~batchnorm.tools.audit` (a package: its checks by category, the report and its
  output): ``audit``;
* :mod:`~batchnorm.tools.keras`: ``from_keras``.
"""
