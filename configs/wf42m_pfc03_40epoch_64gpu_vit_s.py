# ViT-S on WebFace42M, CosFace, Partial FC 0.3, AdamW, 40 epochs, 64 GPUs x 384.
# Seed row: [000 ViT] WF42M-PFC-0.3 | VIT-S(384*64) | FLOPs 5.7 | MFR-ALL 95.87 | IJB-C(1E-4) 97.73 | IJB-C(1E-5) 96.57 | Throughput ~25000
# Dataset: WebFace42M, 2,059,906 identities, 42,474,557 images; rec is a placeholder path.
# GPUs: 64 (8 hosts x 8); global batch 64 x 384 = 24,576.
# Launch: horovodrun -np 64 -hostfile hosts bash config.sh configs/wf42m_pfc03_40epoch_64gpu_vit_s.py   # hosts: 8 lines 'ipN slots=8'
#     or: torchrun --nnodes=8 --node_rank=K --nproc_per_node=8 --master_addr=ip1 --master_port=12581 -m partialfc.train configs/wf42m_pfc03_40epoch_64gpu_vit_s.py   # on each host K = 0..7
# vit_s_dp005_mask_0: ViT-S with stochastic depth 0.05 and no token masking, arcface_torch's name.
from easydict import EasyDict as edict

config = edict()
config.margin_list = (1.0, 0.0, 0.4)  # CosFace
config.network = 'vit_s_dp005_mask_0'
config.resume = False
config.output = None  # work_dirs/wf42m_pfc03_40epoch_64gpu_vit_s
config.embedding_size = 512
config.sample_rate = 0.3
config.interclass_filtering_threshold = 0
config.fp16 = True
config.optimizer = 'adamw'
config.weight_decay = 0.1
config.batch_size = 384  # per GPU
config.lr = 0.001
config.verbose = 2000

config.rec = '/train_tmp/WebFace42M'
config.num_classes = 2059906
config.num_image = 42474557
config.num_epoch = 40
config.warmup_epoch = 4
config.val_targets = []
