#!/bin/sh
# Make a CA, a server certificate for the NBD server of pull backups, and a client
# certificate, with GnuTLS' certtool (Debian: gnutls-bin), in the layout QEMU and
# libnbd read:
#   OUT/server  ca-cert.pem server-cert.pem server-key.pem   -> Driver(tls_x509_cert_dir=...)
#   OUT/client  ca-cert.pem client-cert.pem client-key.pem   -> nbdcopy/qemu-img clients
#   OUT/ca      ca-cert.pem ca-key.pem                       (keep the CA key offline)
# Usage: tls_certs.sh OUT [SERVER_NAME [CLIENT_NAME [DAYS]]]
#
# Every QEMU we support accepts these: RSA keys, and the server certificate's key
# usage allows digital signature *and* key encipherment (QEMU 10.0 refuses a server
# certificate without key encipherment, which is what ECDSA keys get from
# certtool's encryption_key; 7.2 accepted it).
set -eu
out=${1:?usage: tls_certs.sh OUT [SERVER_NAME [CLIENT_NAME [DAYS]]]}
server=${2:-localhost}
client=${3:-backup-client}
days=${4:-365}
umask 077
mkdir -p "$out/ca" "$out/server" "$out/client"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

key() { certtool --generate-privkey --key-type rsa --bits 3072 --outfile "$1" 2>/dev/null; }

cat > "$work/ca.tmpl" <<TMPL
cn = "pyvirtbackup CA for $server"
ca
cert_signing_key
crl_signing_key
expiration_days = $days
TMPL
key "$out/ca/ca-key.pem"
certtool --generate-self-signed --load-privkey "$out/ca/ca-key.pem" \
    --template "$work/ca.tmpl" --outfile "$out/ca/ca-cert.pem" 2>/dev/null

case "$server" in
    *[!0-9.]*) san="dns_name = \"$server\"" ;;
    *) san="ip_address = \"$server\"" ;;
esac
cat > "$work/server.tmpl" <<TMPL
cn = "$server"
$san
tls_www_server
signing_key
encryption_key
expiration_days = $days
TMPL
cat > "$work/client.tmpl" <<TMPL
cn = "$client"
tls_www_client
signing_key
encryption_key
expiration_days = $days
TMPL
for who in server client; do
    key "$out/$who/$who-key.pem"
    certtool --generate-certificate --load-privkey "$out/$who/$who-key.pem" \
        --load-ca-certificate "$out/ca/ca-cert.pem" --load-ca-privkey "$out/ca/ca-key.pem" \
        --template "$work/$who.tmpl" --outfile "$out/$who/$who-cert.pem" 2>/dev/null
    cp "$out/ca/ca-cert.pem" "$out/$who/ca-cert.pem"
done
chmod 0644 "$out"/*/ca-cert.pem "$out"/server/server-cert.pem "$out"/client/client-cert.pem
echo "$out/server: for Driver(tls_x509_cert_dir=...); $out/client: for the clients"
