"""Placeholder until the dashboard lands: loads a model and prints its prediction."""
import streamlit as st
import torch

from equishift import anchorize
from timm.models.vision_transformer import VisionTransformer

st.title("equishift")
model = anchorize(VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10)).eval()
with torch.no_grad():
    st.write("prediction on a random image:", int(model(torch.randn(1, 3, 32, 32)).argmax()))
