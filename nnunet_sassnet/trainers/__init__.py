"""nnU-Net trainers of this package; each module holds one trainer (or its shared base).

* :class:`nnUNetTrainerSDM` (``sdm_trainer``): nnU-Net + SDM head + ``alpha * MSE(SDM)``, labeled patches only.
* :class:`nnUNetTrainerSemiSupervised` (``semisupervised``): the shared labeled + unlabeled step.
* :class:`nnUNetTrainerSASSNet` (``sassnet``): SASSNet's adversarial shape constraint.
* :class:`nnUNetTrainerDTC`, :class:`nnUNetTrainerDTCSASSNet` (``dtc``): dual-task consistency between the
  segmentation and the SDM head (without / with SASSNet's discriminator).
* :class:`nnUNetTrainerMeanTeacher` (``mean_teacher``): an EMA teacher's predictions on unlabeled patches;
  :class:`nnUNetTrainerMeanTeacherTwoView`: the teacher sees another view (``consistency_views``).
* :class:`nnUNetTrainerBCP` (``bcp``): labeled-labeled copy-paste pre-training, then bidirectional copy-paste
  between labeled and unlabeled patches with an EMA teacher.
* :class:`nnUNetTrainerAugmentOnDevice` (``device_augmentation``): nnU-Net's trainer with its augmentation batched
  on the training device (the ``augment_on_device`` setting of every trainer here).
* ``output_layers``: ``-pretrained_weights`` with the output layers; ``published_loss``: the published balance of
  supervised loss and unlabeled term.
"""
from nnunet_sassnet.trainers.device_augmentation import nnUNetTrainerAugmentOnDevice
from nnunet_sassnet.trainers.sassnet import nnUNetTrainerSASSNet, random_patch_indices
from nnunet_sassnet.trainers.sdm_trainer import NonFiniteLossError, nnUNetTrainerSDM, sdm_channel_slice
from nnunet_sassnet.trainers.semisupervised import CHECKPOINT_KEY, gaussian_rampup, nnUNetTrainerSemiSupervised
from nnunet_sassnet.trainers.variant_factory import trainer_variant
from nnunet_sassnet.trainers.bcp import nnUNetTrainerBCP
from nnunet_sassnet.trainers.dtc import nnUNetTrainerDTC, nnUNetTrainerDTCSASSNet
from nnunet_sassnet.trainers.mean_teacher import nnUNetTrainerMeanTeacher, nnUNetTrainerMeanTeacherTwoView

__all__ = ["nnUNetTrainerSDM", "nnUNetTrainerSemiSupervised", "nnUNetTrainerSASSNet", "NonFiniteLossError",
           "gaussian_rampup", "trainer_variant", "sdm_channel_slice", "random_patch_indices", "CHECKPOINT_KEY",
           "nnUNetTrainerDTC", "nnUNetTrainerDTCSASSNet", "nnUNetTrainerMeanTeacher", "nnUNetTrainerMeanTeacherTwoView",
           "nnUNetTrainerBCP", "nnUNetTrainerAugmentOnDevice"]
