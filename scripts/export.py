"""
A trained model out of this repository, in the formats its users load:

    # a tokenizer (stage 1 or 2 ckpt.pt) -> an official VTP folder: config.json + model.safetensors,
    # which MiniMax-AI/VTP's `VTPModel.from_pretrained(folder)` and our VTP.from_official read
    python scripts/export.py out/decoder/ckpt.pt exported/vtp
    # a DiT (train_dit.py ckpt.pt) -> one weights-only .safetensors: the EMA weights under
    # LightningDiT's names, its latent statistics ('latent_stats.mean', 'latent_stats.std') and its
    # config (the metadata); sample.py --ckpt reads it, with --tokenizer
    python scripts/export.py out/dit/ckpt.pt exported/dit.safetensors

The official VTPModel builds its pixel decoder for patch 16 and an MLP ratio of 4 whatever the
config says, and tokenizes text with CLIP's BPE: a tokenizer outside that (the tiny preset: patch
8, word-level text) is exported with a warning, and loads with VTP.from_official only.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vtp  # noqa: E402  (the repository's model file)


def official_config(cfg):
    # our VTPConfig -> the fields of the official VTPConfig (MiniMax-AI/VTP,
    # vtp/models/vtp_hf/configuration_vtp.py); LayerScale 0 is the official None (off)
    return {'model_type': 'vtp', 'architectures': ['VTPModel'], 'image_size': cfg.image_size,
            'train_clip': cfg.train_clip, 'train_reconstruction': cfg.train_reconstruction,
            'vision_patch_size': cfg.patch_size, 'vision_embed_dim': cfg.embed_dim,
            'vision_depth': cfg.depth, 'vision_num_heads': cfg.num_heads,
            'vision_mlp_ratio': cfg.mlp_ratio, 'vision_ffn_layer': cfg.ffn_layer,
            'vision_norm_layer': cfg.norm_layer, 'vision_init_values': cfg.init_values or None,
            'vision_use_qk_norm': cfg.qk_norm, 'vision_feature_bottleneck': cfg.bottleneck_dim,
            'vision_bottleneck_ae_only': cfg.bottleneck_ae_only, 'vision_clip_feat': cfg.clip_feat,
            'text_context_length': cfg.text_context_length, 'text_vocab_size': cfg.text_vocab_size,
            'text_embed_dim': cfg.text_embed_dim, 'text_num_heads': cfg.text_num_heads,
            'text_depth': cfg.text_depth, 'text_mlp_ratio': cfg.text_mlp_ratio,
            'text_ls_init_value': cfg.text_ls_init_value or None,
            'decoder_embed_dim': cfg.decoder_embed_dim, 'decoder_num_heads': cfg.decoder_num_heads,
            'decoder_depth': cfg.decoder_depth, 'decoder_ffn_layer': cfg.decoder_ffn_layer,
            'decoder_norm_layer': cfg.decoder_norm_layer,
            'decoder_init_values': cfg.decoder_init_values or None,
            'decoder_use_qk_norm': cfg.decoder_qk_norm, 'text_tokenizer': cfg.text_tokenizer}


def export_tokenizer(path, out):
    model = vtp.load_tokenizer(path)
    cfg = model.config
    # the official model builds its MLPs from the ratio: a width it would not build cannot go
    for name, dim, ratio, hidden, layer in (
            ('encoder', cfg.embed_dim, cfg.mlp_ratio, cfg.ffn_hidden, cfg.ffn_layer),
            ('decoder', cfg.decoder_embed_dim, 4.0, cfg.decoder_ffn_hidden, cfg.decoder_ffn_layer)):
        align = int(layer[6:] or 8) if layer.startswith('swiglu') else 0
        built = vtp.swiglu_hidden(dim, ratio, align) if align else int(dim * ratio)
        if hidden and hidden != built:
            raise SystemExit(f"error: the {name}'s MLP width {hidden} is not the {built} of an "
                             f"official {layer} of ratio {ratio}: not expressible in config.json")
    if cfg.train_reconstruction and cfg.patch_size != 16 or cfg.text_tokenizer != 'bpe':
        print(f"warning: patch {cfg.patch_size}, {cfg.text_tokenizer} text: the official VTPModel "
              "builds patch-16 decoders and reads CLIP's BPE; this folder loads with "
              "vtp.VTP.from_official")
    # the training-only SSL heads stay behind, as in the official release
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith(('dino_head.', 'ibot_head.'))}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, 'config.json'), 'w') as f:
        json.dump(official_config(cfg), f, indent=2)
    vtp.save_safetensors(state, os.path.join(out, 'model.safetensors'), {'format': 'pt'})
    print(f"wrote {out}/config.json and model.safetensors ({len(state)} tensors)")


def export_dit(ckpt, out):
    state = dict(ckpt['ema'])  # the EMA weights, which sampling uses
    state.update({f'latent_stats.{k}': v for k, v in ckpt['latent_stats'].items()})
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    vtp.save_safetensors(state, out, {'format': 'pt', 'config': json.dumps(ckpt['config']),
                                      'tokenizer_encoder_sha256':
                                          ckpt['tokenizer']['encoder_sha256']})
    print(f"wrote {out}: the EMA DiT and its latent statistics ({len(state)} tensors)")


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description=__doc__.strip().split('\n\n')[0])
    parser.add_argument('ckpt', help="a tokenizer (ckpt.pt of stage 1 or 2) or a DiT (stage 3)")
    parser.add_argument('out', help="the folder of a tokenizer, the .safetensors of a DiT")
    args = parser.parse_args()
    ckpt = vtp.load_checkpoint(args.ckpt, 'ckpt')
    if ckpt.get('stage') == 3:
        export_dit(ckpt, args.out)
    else:
        try:
            export_tokenizer(args.ckpt, args.out)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            raise SystemExit(f"error: {args.ckpt}: {vtp.first_line(e)}")
