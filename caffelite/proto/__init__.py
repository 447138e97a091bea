"""Caffe's protobuf schema (our own ``caffe.proto``) and its message classes."""
