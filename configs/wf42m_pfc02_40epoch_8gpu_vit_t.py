# ViT-T on WebFace42M, CosFace, Partial FC 0.2, AdamW, 40 epochs, one host.
# Seed row: [000 single-host] WF42M-PFC-0.2 | ViT-T-1.5G | MFR-ALL 92.04 | IJB-C(1E-4) 97.27 | IJB-C(1E-5) 95.68
# Dataset: WebFace42M, 2,059,906 identities, 42,474,557 images; rec is a placeholder path.
# GPUs: 8 (one host); global batch 8 x 512 = 4,096.
# Launch: torchrun --nproc_per_node=8 -m partialfc.train configs/wf42m_pfc02_40epoch_8gpu_vit_t.py
#     or: horovodrun -np 8 -H localhost:8 bash config.sh configs/wf42m_pfc02_40epoch_8gpu_vit_t.py
# vit_t_dp005_mask0 is ViT-T with stochastic depth 0.05 and no token masking, arcface_torch's name.
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.network = 'vit_t_dp005_mask0'
config.resume = False
config.output = None  # work_dirs/wf42m_pfc02_40epoch_8gpu_vit_t
config.embedding_size = 512
config.sample_rate = 0.2
config.interclass_filtering_threshold = 0
config.fp16 = True
config.optimizer = 'adamw'
config.weight_decay = 0.1
config.batch_size = 512  # per GPU
config.lr = 0.001
config.verbose = 2000

config.rec = '/train_tmp/WebFace42M'
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 40
config.warmup_epoch = 4
config.val_targets = []
