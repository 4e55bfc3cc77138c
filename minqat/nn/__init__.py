"""Module namespaces mirroring torch.ao.nn: ``intrinsic`` (fused float containers), ``qat``
(QAT twins of Conv/Linear) and ``intrinsic.qat`` (fused QAT modules that fold BatchNorm)."""
