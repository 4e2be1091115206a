# ViT-B on WebFace42M, CosFace, Partial FC 0.3, AdamW, 40 epochs, one host with a 24k global batch (8 x 256 x 12 micro-batches).
# Seed row: [000 single-host] WF42M-PFC-0.3 | ViT-B-11G | MFR-ALL 97.16 | IJB-C(1E-4) 97.91 | IJB-C(1E-5) 97.05
# Dataset: WebFace42M, 2,059,906 identities, 42,474,557 images; rec is a placeholder path.
# GPUs: 8 (one host); global batch 8 x 256 x 12 micro-batches = 24,576.
# Launch: torchrun --nproc_per_node=8 -m partialfc.train configs/wf42m_pfc03_40epoch_8gpu_vit_b.py
#     or: horovodrun -np 8 -H localhost:8 bash config.sh configs/wf42m_pfc03_40epoch_8gpu_vit_b.py
# vit_b_dp005_mask_005: ViT-B with stochastic depth 0.05 and 5% token masking, arcface_torch's name.
# gradient_acc = 12: each optimizer step sums 12 micro-batches, global batch 256 x 8 x 12 = 24,576.
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.network = 'vit_b_dp005_mask_005'
config.resume = False
config.output = None  # work_dirs/wf42m_pfc03_40epoch_8gpu_vit_b
config.embedding_size = 512
config.sample_rate = 0.3
config.interclass_filtering_threshold = 0
config.fp16 = True
config.optimizer = 'adamw'
config.weight_decay = 0.1
config.batch_size = 256  # per GPU
config.gradient_acc = 12
config.lr = 0.001
config.verbose = 2000

config.rec = '/train_tmp/WebFace42M'
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 40
config.warmup_epoch = 4
config.val_targets = []
