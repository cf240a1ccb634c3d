"""medtl: transfer learning for medical imaging.

The pipeline runs one way through the subpackages: ``io`` (scans, manifests) -> ``transforms``
(MONAI preprocessing) -> ``backbones`` (pretrained networks) -> ``adapt`` (fine-tuning
strategies) -> ``train`` -> ``calibrate`` -> ``metrics`` -> ``report``, and ``bundle`` /
``infer`` for deployment.  ``cli`` wires them into the ``medtl`` command.
"""

import logging
import warnings

__version__ = "0.1.0"

# MONAI announces at import that NVIDIA's optional GPU JPEG decoder is absent; pydicom's own
# decoders (and the codecs extra) are what medtl uses, so the notice is only noise.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
