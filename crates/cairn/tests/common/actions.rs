//! Actions for the Execution tests: a `/bin/sh -c SCRIPT` command for Linux workers
//! (`OSFamily=linux`, `PATH=/bin:/usr/bin`), the blobs it needs, and their upload.

use cairn_core::proto::build::bazel::remote::execution::v2 as re;
use cairn_core::{Digest, DigestFunction};
use prost::Message;
use re::content_addressable_storage_client::ContentAddressableStorageClient;

const SHA: DigestFunction = DigestFunction::Sha256;

/// What the action runs and declares.
#[derive(Default)]
pub struct ShellAction<'a> {
    pub script: &'a str,
    /// `output_files` of the Command.
    pub outputs: &'a [&'a str],
    /// Files of the input root, as (name, contents).
    pub inputs: &'a [(&'a str, &'a [u8])],
    pub do_not_cache: bool,
}

impl ShellAction<'_> {
    /// The action's digest, and every blob it needs: the input files, the input root
    /// `Directory`, the `Command` and the `Action`, in that order.
    pub fn build(&self) -> (Digest, Vec<Vec<u8>>) {
        self.build_with_platform(&[("OSFamily", "linux")])
    }

    /// As `build`, with the Action's platform properties `platform` (name, value) instead of
    /// `OSFamily=linux`; an empty slice gives an Action that names no property.
    pub fn build_with_platform(&self, platform: &[(&str, &str)]) -> (Digest, Vec<Vec<u8>>) {
        let mut blobs: Vec<Vec<u8>> = self.inputs.iter().map(|(_, c)| c.to_vec()).collect();
        let root = re::Directory {
            files: self
                .inputs
                .iter()
                .map(|(name, contents)| re::FileNode {
                    name: name.to_string(),
                    digest: Some(SHA.compute(contents).to_proto()),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
        .encode_to_vec();
        #[allow(deprecated)]
        let command = re::Command {
            arguments: vec!["/bin/sh".into(), "-c".into(), self.script.into()],
            environment_variables: vec![re::command::EnvironmentVariable {
                name: "PATH".into(),
                value: "/bin:/usr/bin".into(),
            }],
            output_files: self.outputs.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
        .encode_to_vec();
        let action = re::Action {
            command_digest: Some(SHA.compute(&command).to_proto()),
            input_root_digest: Some(SHA.compute(&root).to_proto()),
            do_not_cache: self.do_not_cache,
            platform: Some(re::Platform {
                properties: platform
                    .iter()
                    .map(|(name, value)| re::platform::Property {
                        name: name.to_string(),
                        value: value.to_string(),
                    })
                    .collect(),
            }),
            ..Default::default()
        }
        .encode_to_vec();
        let digest = SHA.compute(&action);
        blobs.extend([root, command, action]);
        (digest, blobs)
    }

    /// Uploads every blob of the action to `instance` and returns its digest.
    pub async fn upload(&self, channel: tonic::transport::Channel, instance: &str) -> Digest {
        let (digest, blobs) = self.build();
        upload_blobs(channel, instance, blobs).await;
        digest
    }
}

/// Uploads `blobs` (SHA-256) with one BatchUpdateBlobs; panics unless each is stored.
pub async fn upload_blobs(channel: tonic::transport::Channel, instance: &str, blobs: Vec<Vec<u8>>) {
    let requests = blobs
        .into_iter()
        .map(|data| re::batch_update_blobs_request::Request {
            digest: Some(SHA.compute(&data).to_proto()),
            data,
            compressor: 0,
        })
        .collect();
    let reply = ContentAddressableStorageClient::new(channel)
        .batch_update_blobs(re::BatchUpdateBlobsRequest {
            instance_name: instance.into(),
            requests,
            ..Default::default()
        })
        .await
        .expect("BatchUpdateBlobs")
        .into_inner();
    for r in &reply.responses {
        let code = r.status.as_ref().map_or(0, |s| s.code);
        assert_eq!(code, 0, "uploading {:?}: {:?}", r.digest, r.status);
    }
}
