"""The cluster planner behind `pretrain plan`: a recipe's memory per GPU by ZeRO stage, step time from the FLOPs
model and an MFU, communication per step, and the time to train T tokens on 8 to 4,096 GPUs."""

from pretrain.plan.estimate import GPUS, Cluster, GPUSpec, Memory, StepEstimate, estimate_step, memory_per_gpu
from pretrain.plan.planner import SCALE, Plan, calibrated_plan, make_plan, workload
from pretrain.plan.shapes import model_shape
from pretrain.plan.workload import Workload

__all__ = ["GPUS", "SCALE", "Cluster", "GPUSpec", "Memory", "Plan", "StepEstimate", "Workload", "calibrated_plan",
           "estimate_step", "make_plan", "memory_per_gpu", "model_shape", "workload"]
