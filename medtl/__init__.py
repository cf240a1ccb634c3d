"""medtl: transfer learning for medical imaging.

The pipeline runs one way through the subpackages: ``io`` (scans, manifests) -> ``transforms``
(MONAI preprocessing) -> ``backbones`` (pretrained networks) -> ``adapt`` (fine-tuning
strategies) -> ``train`` -> ``calibrate`` -> ``metrics`` -> ``report``, and ``bundle`` /
``infer`` for deployment.  ``cli`` wires them into the ``medtl`` command.
"""

__version__ = "0.1.0"
